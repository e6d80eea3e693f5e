"""The UI's server: a FastAPI app with a plain page (static/index.html) and a JSON API over
weightmix's own API. It holds no merge logic: a form becomes a Recipe, and the Recipe goes to
api.dry_run / api.make_plan + api.execute exactly as `weightmix merge` sends it.

Every path the browser names passes through ModelDirs (inside the models directories, no
'..'); errors reach the browser as their one line (WeightmixError) or as "internal error"
with the details in the server's log, never as a traceback."""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from weightmix import __version__
from weightmix.arch.families import Architecture, detect
from weightmix.blocks import parse_block_value, per_block, presets
from weightmix.errors import WeightmixError, one_line
from weightmix.io import open_checkpoint
from weightmix.io.locks import DestinationLock
from weightmix.methods import METHODS
from weightmix.report import describe_plan
from weightmix.ui import checks
from weightmix.ui.history import FILE_NAME, History
from weightmix.ui.jobs import Jobs
from weightmix.ui.library import ModelDirs
from weightmix.units import format_size

log = logging.getLogger("weightmix.ui")
STATIC = Path(str(resources.files("weightmix.ui").joinpath("static")))
MAX_CELLS = 8  # images in a preview grid


@dataclass
class Settings:
    dirs: ModelDirs
    threads: int | None = None
    pipeline: Path | None = None  # a diffusers pipeline folder for preview grids
    auth: tuple[str, str] | None = None
    # Host headers served (a page of another site renamed to 127.0.0.1 by its DNS is refused);
    # None: any (the UI listens on a network address)
    hosts: tuple[str, ...] | None = ("127.0.0.1", "localhost", "[::1]")


SIMPLE_TYPES = ("text/plain", "multipart/form-data", "application/x-www-form-urlencoded")
MAX_ID = 2**63 - 1


def create_app(settings: Settings) -> FastAPI:
    """The app for these settings (its merge worker starts with it)."""
    dirs = settings.dirs
    lock = _serve_alone(dirs.first)
    try:
        history = History(dirs.first)
        history.interrupted()
    except BaseException:
        lock.release()
        raise
    jobs = Jobs(history, settings.threads)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        jobs.stop()
        history.close()
        lock.release()

    app = FastAPI(title="weightmix", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url=None, lifespan=lifespan)  # fmt: skip
    app.state.jobs, app.state.history, app.state.settings = jobs, history, settings
    app.state.lock = lock  # released when the app stops (or by whoever never started it)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        try:
            refused = _refused(request, settings)
            if refused is not None:
                return refused
            return await call_next(request)
        except WeightmixError as error:  # in the page's words
            message = str(error).replace("pass --overwrite", "tick 'overwrite'")
            return JSONResponse({"error": message}, 400)
        except Exception as error:  # the details to the log, one line to the browser
            log.exception("%s %s failed", request.method, request.url.path)
            name = type(error).__name__
            message = f"internal error ({name}); the details are in the server's log"
            return JSONResponse({"error": one_line(message)}, 500)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, error: RequestValidationError) -> JSONResponse:
        problem = error.errors()[0] if error.errors() else {}
        where = ".".join(str(part) for part in problem.get("loc", ()) if part != "path")
        return JSONResponse({"error": one_line(f"{where}: {problem.get('msg', 'invalid')}")}, 400)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/")
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/api/state")
    def state() -> dict:
        return {
            "version": __version__,
            "dirs": [str(d) for d in dirs.dirs],
            "preview": settings.pipeline is not None,  # else: when the first model is one
            "methods": _methods(),
            "dtypes": ["fp16", "bf16", "fp32"],
        }

    @app.get("/api/models")
    def models() -> list[dict]:
        return [_model_info(str(m.path), m.size, m.modified) for m in dirs.models()]

    @app.get("/api/presets")
    def block_presets(model: str = "") -> dict[str, list[float]]:
        path = dirs.model(model)
        stat = path.stat()
        info = _model_info(str(path), stat.st_size, stat.st_mtime)
        return _presets(info["architecture"], tuple(info["blocks"]))

    @app.post("/api/dry-run")
    async def dry_run(request: Request) -> dict:
        form = checks.json_object(await request.body())
        return await run_in_threadpool(_dry_run, dirs, form)

    @app.post("/api/recipe")
    async def recipe_yaml(request: Request) -> PlainTextResponse:
        form = checks.json_object(await request.body())

        def checked() -> str:
            recipe = checks.checked_recipe(dirs, form.get("recipe"))
            checks.planned(dirs, recipe, None, False).close()
            return recipe.to_yaml()

        return PlainTextResponse(await run_in_threadpool(checked), media_type="application/yaml")

    @app.post("/api/recipe/parse")
    async def parse_upload(request: Request) -> dict:
        body = await request.body()
        recipe = await run_in_threadpool(checks.uploaded_recipe, dirs, body)
        return {"recipe": yaml.safe_load(recipe.to_yaml())}

    @app.post("/api/merge")
    async def merge(request: Request) -> dict:
        form = checks.json_object(await request.body())
        return await run_in_threadpool(_submit, dirs, jobs, form)

    @app.get("/api/jobs/{merge_id}")
    def job(merge_id: int) -> dict:
        found = jobs.jobs.get(merge_id)
        if found is None:
            raise WeightmixError(f"no merge {merge_id} since the UI started")
        return {**found.view(), "ahead": jobs.ahead_of(found)}

    @app.post("/api/jobs/{merge_id}/cancel")
    def cancel(merge_id: int) -> dict:
        found = jobs.cancel(merge_id)
        if found is None:
            raise WeightmixError(f"no merge {merge_id} since the UI started")
        return found.view()

    @app.get("/api/history")
    def merges() -> list[dict]:
        return history.recent()

    @app.get("/api/history/{merge_id}/recipe.yaml")
    def history_recipe(merge_id: int) -> PlainTextResponse:
        return PlainTextResponse(_row(history, merge_id)["recipe"], media_type="application/yaml")

    @app.post("/api/history/{merge_id}/rerun")
    async def rerun(merge_id: int, request: Request) -> dict:
        row = _row(history, merge_id)
        form = checks.json_object(await request.body())
        again = {"recipe": yaml.safe_load(row["recipe"]), "overwrite": form.get("overwrite", False),
                 "output": form.get("output") or row["output"]}  # fmt: skip
        return await run_in_threadpool(_submit, dirs, jobs, again)

    @app.post("/api/similarity")
    async def similarity(request: Request) -> Response:
        form = checks.json_object(await request.body())
        picked = form.get("models")
        if not isinstance(picked, list) or not all(isinstance(p, str) for p in picked):
            raise WeightmixError("similarity: give the models as a list of paths")
        paths = [dirs.model(p) for p in picked]
        if len(paths) < 2:
            raise WeightmixError("similarity compares models: pick at least two")
        image = await run_in_threadpool(_similarity_png, dirs, paths, jobs)
        return Response(image, media_type="image/png")

    @app.post("/api/preview")
    async def preview(request: Request) -> Response:
        form = checks.json_object(await request.body())
        image = await run_in_threadpool(_preview_png, form, settings, jobs)
        return Response(image, media_type="image/png")

    return app


def _serve_alone(folder: Path) -> DestinationLock:
    """One UI per first models directory (its queue and history): a lock beside the
    history file, dropped by the kernel if the UI dies."""
    try:
        return DestinationLock(folder / FILE_NAME)
    except WeightmixError as error:
        holder = re.search(r"\(process \d+\)", str(error))
        raise WeightmixError(
            f"another weightmix ui{' ' + holder[0] if holder else ''} serves the models"
            f" directory {folder}: stop it, or put another folder first with --models-dir"
        ) from None


def _refused(request: Request, settings: Settings) -> Response | None:
    """A request the UI does not serve: without the password, for a host name it is not
    (DNS rebinding), from another site's page (its Origin), or a POST of a type a page of
    another site may send without asking (a 'simple' request: text/plain, forms)."""
    if settings.auth is not None and not _authorised(request, settings.auth):
        return PlainTextResponse("weightmix: sign in", 401,
                                 {"WWW-Authenticate": 'Basic realm="weightmix"'})  # fmt: skip
    host = request.headers.get("host", "")
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    if settings.hosts is not None and name not in settings.hosts:
        return JSONResponse({"error": f"the UI is not served as {host!r}: open the address"
                                      " `weightmix ui` printed"}, 403)  # fmt: skip
    origin = request.headers.get("origin")
    if origin is not None and origin.split("://", 1)[-1] != host:
        return JSONResponse({"error": "requests from another site's page are refused"}, 403)
    if request.method == "POST":
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if not kind or kind in SIMPLE_TYPES:
            return JSONResponse({"error": "send the request as application/json (or"
                                          " application/yaml for a recipe)"}, 415)  # fmt: skip
    parts = request.url.path.split("/")
    number = parts[3] if len(parts) > 3 else ""
    numbered = parts[2:3] in (["jobs"], ["history"]) and number.isascii() and number.isdigit()
    if numbered and int(number) > MAX_ID:
        raise WeightmixError(f"no merge {number}")
    return None


def _authorised(request: Request, auth: tuple[str, str]) -> bool:
    import base64

    header = request.headers.get("authorization", "")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, _, password = base64.b64decode(encoded, validate=True).partition(b":")
    except ValueError:
        return False
    expected_user, expected_password = (part.encode("utf-8") for part in auth)
    return secrets.compare_digest(user, expected_user) & secrets.compare_digest(
        password, expected_password
    )


def _row(history: History, merge_id: int) -> dict:
    row = history.get(merge_id)
    if row is None:
        raise WeightmixError(f"no merge {merge_id} in the history")
    return row


def _dry_run(dirs: ModelDirs, form: dict) -> dict:
    recipe, output, overwrite = checks.merge_request(dirs, form)
    plan = checks.planned(dirs, recipe, output, overwrite)
    try:
        text = describe_plan(plan)
    finally:
        plan.close()
    return {"plan": text, "recipe": recipe.to_yaml()}


def _submit(dirs: ModelDirs, jobs: Jobs, form: dict) -> dict:
    recipe, output, overwrite = checks.merge_request(dirs, form)
    checks.planned(dirs, recipe, output, overwrite).close()  # refuse now what would fail later
    job = jobs.submit(recipe, output, overwrite)
    return {**job.view(), "ahead": jobs.ahead_of(job)}


def _preview_png(form: dict, settings: Settings, jobs: Jobs) -> bytes:
    """The preview grid of the recipe along one parameter (`weightmix preview`'s grid),
    drawn while no merge runs."""
    import io

    from weightmix.analysis.preview import Sweep, check_sweeps, pipeline_folder, run_preview

    recipe = checks.checked_recipe(settings.dirs, form.get("recipe"))
    name, values = str(form.get("param") or "").strip(), form.get("values")
    if not name or not isinstance(values, list) or not 1 <= len(values) <= MAX_CELLS:
        raise WeightmixError(f"preview: name a parameter and give 1 to {MAX_CELLS} values")
    prompt = form.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > 1000:
        raise WeightmixError("preview: write a prompt (at most 1,000 characters)")
    seed, steps, size = (_integer(form, n, low, high, default) for n, low, high, default in
                         (("seed", 0, 2**32 - 1, 0), ("steps", 1, 100, 20),
                          ("size", 8, 1024, 256)))  # fmt: skip
    data = yaml.safe_load(recipe.to_yaml())
    sweep = Sweep(name, values)
    family = check_sweeps(data, [sweep], recipe.base_dir)
    checks.planned(settings.dirs, recipe, None, False).close()
    folder = pipeline_folder(recipe, settings.pipeline, family)
    with _alone(jobs):
        grid = run_preview(data, recipe, [sweep], prompt, seed, steps, folder, "cpu", size)
    buffer = io.BytesIO()
    grid.image.save(buffer, format="PNG")
    return buffer.getvalue()


def _integer(form: dict, name: str, low: int, high: int, default: int) -> int:
    value = form.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise WeightmixError(f"preview: {name} is a whole number from {low} to {high}")
    return value


def _methods() -> list[dict]:
    """Each method with its parameters: name, default, and range where the type has one."""
    found = []
    for name, spec in sorted(METHODS.items()):
        params = []
        for param in spec.params.values():
            schema = _schema(param)
            params.append({
                "name": param.name,
                "default": None if param.required else _jsonable(param.default),
                "required": param.required,
                "numeric": param.numeric,
                "text": schema.get("type") == "string",
                "minimum": _bound(schema, ("minimum", "ge", "exclusiveMinimum", "gt")),
                "maximum": _bound(schema, ("maximum", "le", "exclusiveMaximum", "lt")),
            })  # fmt: skip
        found.append({"name": name, "summary": spec.summary, "params": params,
                      "inputs": spec.arity_text()})  # fmt: skip
    return found


def _schema(param: Any) -> dict:
    try:
        schema = param.adapter.json_schema()
    except Exception:  # a type without a JSON schema: no range shown
        return {}
    for option in schema.get("anyOf", []):  # Optional[...]: the number's branch
        if option.get("type") in ("number", "integer"):
            return option
    return schema


def _bound(schema: dict, names: tuple[str, ...]) -> float | None:
    return next((schema[name] for name in names if name in schema), None)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


@lru_cache(maxsize=1024)
def _model_info(path: str, size: int, modified: float) -> dict:
    """A model's architecture, blocks and dtypes from its header (cached per file version)."""
    info: dict[str, Any] = {"path": path, "size": size, "size_text": format_size(size)}
    try:
        with open_checkpoint(path) as checkpoint:
            shapes = {key: t.shape for key, t in checkpoint.tensors.items()}
            dtypes: dict[str, int] = {}
            for tensor in checkpoint.tensors.values():
                dtypes[tensor.dtype.name] = dtypes.get(tensor.dtype.name, 0) + 1
    except WeightmixError as error:
        return {**info, "error": str(error), "architecture": "unreadable", "blocks": []}
    architecture = detect(shapes)
    known = isinstance(architecture, Architecture)
    classes = list(architecture.classes.values()) if known else []
    return {
        **info,
        "architecture": architecture.name if known else "unknown",
        "blocks": list(architecture.blocks) if known else [],
        "components": sorted({c.component for c in classes if c.component}),
        "layers": sorted({kind for c in classes for kind in c.layers}),
        "dtype": max(dtypes, key=dtypes.get) if dtypes else "",
        "tensors": len(shapes),
    }


def _presets(architecture: str, blocks: tuple[str, ...]) -> dict[str, list[float]]:
    """Each preset as values for these blocks (presets that do not convert are left out)."""
    found = {}
    for name in presets() if blocks else ():
        value = parse_block_value(name, "preset")
        assert value is not None
        try:
            found[name] = per_block(value, blocks, architecture, "preset")[0]
        except WeightmixError:
            continue
    return found


def _similarity_png(dirs: ModelDirs, paths: list[Path], jobs: Jobs) -> bytes:
    """The heatmap `weightmix similarity --plot` draws (cosine against the first model, per
    component and block), measured while no merge runs."""
    from weightmix.analysis.plots import EXTRA, heatmap_png
    from weightmix.analysis.similarity import measure_similarity, similarity_plan

    try:  # before the models are read
        import matplotlib  # noqa: F401
    except ImportError:
        raise WeightmixError(EXTRA) from None
    names = {_name(i): str(p) for i, p in enumerate(paths)}
    plan = similarity_plan(names)
    try:
        checks.check_plan_files(dirs, plan)
    finally:
        plan.close()
    with _alone(jobs):
        result = measure_similarity(names)
    models, groups = list(result.models), list(result.groups)
    values = [[result.groups[g]["models"][m]["cosine"] for g in groups]
              for m in range(len(models) - 1)]  # fmt: skip
    return heatmap_png(values, models[1:], groups, f"cosine against {models[0]}")


@contextlib.contextmanager
def _alone(jobs: Jobs) -> Iterator[None]:
    """Run while no merge does, or refuse at once (the page would otherwise wait a merge)."""
    if not jobs.exclusive.acquire(timeout=0.5):
        raise WeightmixError("a merge is running: try again when it has finished")
    try:
        yield
    finally:
        jobs.exclusive.release()


def _name(index: int) -> str:
    """Model names as the CLI gives them: A, B, ... Z, M26, M27 ..."""
    return chr(ord("A") + index) if index < 26 else f"M{index}"
