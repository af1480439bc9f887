"""The click that typer runs on. typer 0.26 and later carry their own copy (`typer._click`);
older ones (0.25, which huggingface_hub's `typer<0.26` pins a fresh install to) use the `click`
package. Commands, options and parameter sources are that module's classes, so code that looks
at them (corral.toml's defaults, `corral config`) takes click from here, never by name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the same API either way; the package is what the type checker knows
    import click
else:
    import typer.core

    click = getattr(typer.core, "_click", None) or typer.core.click

__all__ = ["click"]
