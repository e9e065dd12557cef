"""A tqdm progress bar when tqdm is installed (the `cli` extra) and asked for; a silent stand-in otherwise."""
from __future__ import annotations


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass


def progress_bar(total: int | None, desc: str, unit: str, show: bool = True):
    if not show:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a small optional extra; without it the work runs silently
        return _NoBar()
    return tqdm(total=total, desc=desc, unit=unit)
