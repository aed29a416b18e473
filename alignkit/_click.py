"""The click exceptions that typer raises (recent typer vendors its own click as
`typer._click`; older typer uses click itself)."""
from types import SimpleNamespace

try:
    from typer._click import exceptions as _exc
except ImportError:  # older typer depends on click itself
    from click import exceptions as _exc

click = SimpleNamespace(exceptions=_exc, ClickException=_exc.ClickException,
                        UsageError=_exc.UsageError)
