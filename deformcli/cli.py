"""The deformcli command line (Typer + Rich)."""

import typer

from deformcli import __version__

app = typer.Typer(help="Deformable convolution with no compiled extension.", no_args_is_help=True)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"deformcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Show the version."
    ),
) -> None:
    """deformcli: run models with deformable convolution anywhere torch runs."""


def main() -> None:
    app()
