"""Headless matplotlib for the PNG reports, and saving a figure through the atomic writers."""

from __future__ import annotations

from typing import Any

from sharded_mde.io import PathLike, atomic_path


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, imported on use (most commands draw nothing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: PathLike) -> None:
    """Lays `fig` out, writes it to `path` as a 110 dpi PNG atomically, and closes it."""
    try:
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        pyplot().close(fig)
