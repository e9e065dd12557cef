"""`SparseModel`: the module `sparsify` returns.

It owns a copy of the user's model (the original is never touched) and shares that copy's
parameter, buffer and submodule tables, so its `state_dict()` has the original's keys plus each
site's method state (under `<owning module>.attnpass`), and `.to()`, `.train()`, optimisers and
`load_state_dict` behave as for the original. Calls run a captured, rewritten graph
(`capture.Program`) with the current parameters.

Train and eval are captured separately: export bakes dropout and every `if self.training`
branch into the graph, so the graph for the other mode is captured on the first call in that
mode (from that call's inputs) and rewritten with the *same* site modules.
"""
from __future__ import annotations

import copy

from torch import nn

from attnpass.capture import Program
from attnpass.detect import capture_sites
from attnpass.rewrite import remove_dead_code, rewrite_site
from attnpass.site import AttentionReport, SkippedSite


class SparseModel(nn.Module):
    def __init__(self, source: nn.Module, method: str, site_modules: dict[str, nn.Module], declined: dict[str, str],
                 programs: dict[bool, Program], report: AttentionReport):
        super().__init__()
        object.__setattr__(self, "_source", source)
        # share the copy's tables: same keys in state_dict(), same objects for .to()/.train()
        object.__setattr__(self, "_parameters", source._parameters)
        object.__setattr__(self, "_buffers", source._buffers)
        object.__setattr__(self, "_non_persistent_buffers_set", source._non_persistent_buffers_set)
        object.__setattr__(self, "_modules", source._modules)
        object.__setattr__(self, "_programs", programs)
        object.__setattr__(self, "_site_modules", site_modules)
        object.__setattr__(self, "_declined", declined)  # site name -> why the method left it unchanged
        self.method = method
        self.report = report
        self.training = source.training

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # plain attributes of the original model (e.g. a Hugging Face `config`)
            source = self.__dict__.get("_source")
            if source is not None and not name.startswith("_"):
                return getattr(source, name)
            raise

    @property
    def sites(self):
        return self.report.sites

    def site_modules(self) -> dict[str, nn.Module]:
        """Site name -> the module computing that site's attention."""
        return dict(self._site_modules)

    def forward(self, *args, **kwargs):
        program = self._programs.get(self.training)
        if program is None:
            program = self._capture_mode(self.training, args, kwargs)
        return program(self, args, kwargs)

    def _capture_mode(self, training: bool, args, kwargs) -> Program:
        source = self._source
        source.training = training
        program = capture_and_rewrite(source, args, kwargs, self._site_modules, self._declined)
        self._programs[training] = program
        return program

    def __deepcopy__(self, memo):
        """An independent copy: the model with its site modules is copied; the captured graphs are
        not (they hold fake tensors, which cannot be copied) and are captured again on the copy's
        first call in each mode, rewritten with the copied site modules."""
        source = copy.deepcopy(self._source, memo)
        site_modules = copy.deepcopy(self._site_modules, memo)  # the same memo: the copies attached to source
        clone = SparseModel(source, self.method, site_modules, dict(self._declined), {}, self.report)
        clone.training = self.training
        return clone

    def extra_repr(self) -> str:
        return f"method={self.method!r}, sites={len(self._site_modules)}"


def capture_and_rewrite(source: nn.Module, args, kwargs, site_modules: dict[str, nn.Module],
                        declined: dict[str, str], make_site=None) -> Program:
    """Capture `source`, find its sites, and rewrite each to its module.

    With `make_site(site) -> module | reason`, modules are created (a string is the reason the
    method declines the site, which then stays unchanged); without it (the second mode), every site
    found must already have a module in `site_modules` or a reason in `declined`.
    """
    program = capture_sites(source, args, kwargs)
    if make_site is None:
        names = {s.name for s in program.sites}
        if names != set(site_modules) | set(declined):
            raise RuntimeError(
                "the model's attention sites differ between train and eval mode "
                f"(now {sorted(names)}, before {sorted(site_modules) + sorted(declined)}); attnpass cannot share their state"
            )
    else:
        for site in program.sites:
            made = make_site(site)
            if isinstance(made, str):
                declined[site.name] = made
            else:
                site_modules[site.name] = made
    kept = []
    for site in program.sites:
        if site.name in declined:
            program.skipped.append(SkippedSite(site.name, site.module_path, site.pattern, declined[site.name]))
            continue
        target = f"attnpass_site_{len(kept)}"
        program.gm.add_submodule(target, site_modules[site.name])
        rewrite_site(program.gm, site, target)
        kept.append(site)
    program.sites = kept
    remove_dead_code(program.gm)
    return program
