"""`weightmix ui`: the local web UI (FastAPI and uvicorn, the `ui` extra)."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import socket
from pathlib import Path

import click

from weightmix.errors import WeightmixError

DEFAULT_PORT = 7870  # beside A1111/Forge's 7860, so both can run


@click.command()
@click.option("--models-dir", "models_dirs", multiple=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="A folder of models (repeatable; default: the current folder). The first"
              " also takes the outputs and the merge history.")  # fmt: skip
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True,
              help="0: any free port.")  # fmt: skip
@click.option("--listen", metavar="ADDRESS", default=None,
              help="Serve on this address instead of 127.0.0.1 (e.g. 0.0.0.0: every network"
              " this machine is on can reach it; use --auth).")  # fmt: skip
@click.option("--auth", metavar="USER:PASSWORD", help="Ask the browser for this user and password.")
@click.option("--demo", is_flag=True,
              help="Open on the example models (written to ./demo if missing).")  # fmt: skip
@click.option("--pipeline", type=click.Path(file_okay=False, path_type=Path),
              help="A diffusers pipeline folder for preview grids.")  # fmt: skip
@click.option("--threads", type=click.IntRange(min=1), help="Worker threads of each merge.")
def ui(models_dirs: tuple[Path, ...], port: int, listen: str | None, auth: str | None,
       demo: bool, pipeline: Path | None, threads: int | None) -> None:  # fmt: skip
    """Start the local web UI: pick models, a method and block weights, dry-run, merge, compare,
    and download every merge as a recipe that `weightmix merge` re-runs."""
    try:
        import uvicorn

        from weightmix.ui.app import Settings, create_app
        from weightmix.ui.library import ModelDirs
    except ImportError:
        raise WeightmixError("weightmix ui needs FastAPI and uvicorn: pip install"
                             " 'weightmix[ui]'") from None  # fmt: skip
    folders = list(models_dirs)
    if demo:
        from weightmix.examples import build_examples

        demo_dir = Path("demo")
        if demo_dir.exists() and not demo_dir.is_dir():
            raise WeightmixError("--demo writes the example models to ./demo, which is a file:"
                                 " move it, or run from another folder")  # fmt: skip
        if not any(demo_dir.glob("*.safetensors")):
            build_examples(demo_dir)
        folders = [demo_dir, *folders]
    credentials = _credentials(auth)
    host = _host(listen)
    settings = Settings(ModelDirs(folders), threads, _pipeline(pipeline), credentials,
                        _host_names(host))  # fmt: skip
    listener = bind(host, port)
    app = create_app(settings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    shown = f"[{host}]" if ":" in host else host
    port = listener.getsockname()[1]
    click.echo(f"weightmix ui: http://{shown}:{port}/ (models: {settings.dirs.listing()};"
               " Ctrl+C stops it)")  # fmt: skip
    try:
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl+C or SIGTERM once uvicorn stopped
            uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[listener])
    finally:
        app.state.lock.release()
        listener.close()
    click.echo("weightmix ui: stopped")


def _credentials(auth: str | None) -> tuple[str, str] | None:
    if auth is None:
        return None
    user, colon, password = auth.partition(":")
    if not colon or not user or not password:
        raise WeightmixError(f"--auth {auth!r}: write USER:PASSWORD (both not empty)")
    return user, password


def _host(listen: str | None) -> str:
    if listen is None:
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(listen)
    except ValueError:
        raise WeightmixError(f"--listen {listen!r}: give an IP address such as 0.0.0.0") from None
    if not address.is_loopback:
        click.echo(f"weightmix ui: warning: serving on {listen}: other machines can reach the"
                   " UI and its models folders; protect it with --auth", err=True)  # fmt: skip
    return str(address)


def _pipeline(folder: Path | None) -> Path | None:
    if folder is not None and not (folder / "model_index.json").is_file():
        raise WeightmixError(f"--pipeline {folder}: not a diffusers pipeline folder (no"
                             " model_index.json)")  # fmt: skip
    return folder


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or one line naming the port in use and a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        if error.errno == errno.EADDRINUSE:
            free = _free_port(host, port)
            hint = f"pass --port {free} (free now)" if free else "pass another --port"
            raise WeightmixError(f"port {port} is in use on {host}: {hint}") from None
        raise WeightmixError(f"cannot serve on {host}:{port}: {error.strerror}") from None
    listener.listen(64)
    return listener


def _free_port(host: str, taken: int) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for port in range(taken + 1, min(taken + 100, 65536)):
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return port
    return 0


def _host_names(host: str) -> tuple[str, ...]:
    """The names a browser may reach the UI by (its Host header): the loopback names, the
    address served and, on every address (0.0.0.0, ::), this machine's name and addresses.
    Any other name is refused: a page of another site bound to this address by its DNS."""
    names = {"127.0.0.1", "localhost", "[::1]", host if ":" not in host else f"[{host}]"}
    if ipaddress.ip_address(host).is_unspecified:
        machine = socket.gethostname()
        names |= {machine, socket.getfqdn()}
        try:
            found = socket.getaddrinfo(machine, None)
        except OSError:
            found = []
        for *_, address in found:
            text = str(address[0])
            names.add(f"[{text}]" if ":" in text else text)
    return tuple(sorted(names))
