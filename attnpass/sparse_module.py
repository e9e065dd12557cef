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

from torch import nn

from attnpass.capture import Program
from attnpass.detect import capture_sites
from attnpass.rewrite import remove_dead_code, rewrite_site
from attnpass.site import AttentionReport


class SparseModel(nn.Module):
    def __init__(self, source: nn.Module, method: str, site_modules: dict[str, nn.Module], programs: dict[bool, Program],
                 report: AttentionReport):
        super().__init__()
        object.__setattr__(self, "_source", source)
        # share the copy's tables: same keys in state_dict(), same objects for .to()/.train()
        object.__setattr__(self, "_parameters", source._parameters)
        object.__setattr__(self, "_buffers", source._buffers)
        object.__setattr__(self, "_non_persistent_buffers_set", source._non_persistent_buffers_set)
        object.__setattr__(self, "_modules", source._modules)
        object.__setattr__(self, "_programs", programs)
        object.__setattr__(self, "_site_modules", site_modules)
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
        program = capture_and_rewrite(source, args, kwargs, self._site_modules)
        self._programs[training] = program
        return program

    def extra_repr(self) -> str:
        return f"method={self.method!r}, sites={len(self._site_modules)}"


def capture_and_rewrite(source: nn.Module, args, kwargs, site_modules: dict[str, nn.Module],
                        make_site=None) -> Program:
    """Capture `source`, find its sites, and rewrite each to its module.

    With `make_site(site) -> (module, attach_path, attr)`, modules are created and registered;
    without it, every site found must already have a module in `site_modules` (second mode).
    """
    program = capture_sites(source, args, kwargs)
    sites = program.sites
    if make_site is None:
        names = {s.name for s in sites}
        if names != set(site_modules):
            raise RuntimeError(
                "the model's attention sites differ between train and eval mode "
                f"(now {sorted(names)}, before {sorted(site_modules)}); attnpass cannot share their state"
            )
    for i, site in enumerate(sites):
        if make_site is not None:
            site_modules[site.name] = make_site(site)
        target = f"attnpass_site_{i}"
        program.gm.add_submodule(target, site_modules[site.name])
        rewrite_site(program.gm, site, target)
    remove_dead_code(program.gm)
    return program
