"""The UI's server: a FastAPI app with a plain page (static/index.html) and a JSON API over
weightmix's own API. It holds no merge logic: a form becomes a Recipe, and the Recipe goes to
api.dry_run / api.make_plan + api.execute exactly as `weightmix merge` sends it.

Every path the browser names passes through ModelDirs (inside the models directories, no
'..'); errors reach the browser as their one line (WeightmixError) or as "internal error"
with the details in the server's log, never as a traceback."""

from __future__ import annotations

import contextlib
import logging
import secrets
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from weightmix import __version__, api
from weightmix.arch.families import Architecture, detect
from weightmix.blocks import parse_block_value, per_block, presets
from weightmix.errors import WeightmixError, one_line
from weightmix.io import open_checkpoint
from weightmix.methods import METHODS
from weightmix.recipe import Recipe, parse_recipe, read_recipe_data
from weightmix.ui.history import History
from weightmix.ui.jobs import Jobs
from weightmix.ui.library import ModelDirs
from weightmix.units import format_size

log = logging.getLogger("weightmix.ui")
STATIC = Path(str(resources.files("weightmix.ui").joinpath("static")))
MAX_UPLOAD = 1 << 20  # a recipe is a few kB
MAX_CELLS = 8  # images in a preview grid


@dataclass
class Settings:
    dirs: ModelDirs
    threads: int | None = None
    pipeline: Path | None = None  # a diffusers pipeline folder for preview grids
    auth: tuple[str, str] | None = None


def create_app(settings: Settings) -> FastAPI:
    """The app for these settings (its merge worker starts with it)."""
    history = History(settings.dirs.first)
    history.interrupted()
    jobs = Jobs(history, settings.threads)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        jobs.stop()
        history.close()

    app = FastAPI(title="weightmix", version=__version__, docs_url=None, redoc_url=None,
                  lifespan=lifespan)  # fmt: skip
    app.state.jobs, app.state.history, app.state.settings = jobs, history, settings

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        if settings.auth is not None and not _authorised(request, settings.auth):
            return PlainTextResponse("weightmix: sign in", 401,
                                     {"WWW-Authenticate": 'Basic realm="weightmix"'})  # fmt: skip
        try:
            return await call_next(request)
        except WeightmixError as error:
            return JSONResponse({"error": str(error)}, 400)
        except Exception as error:  # the details to the log, one line to the browser
            log.exception("%s %s failed", request.method, request.url.path)
            name = type(error).__name__
            message = f"internal error ({name}); the details are in the server's log"
            return JSONResponse({"error": one_line(message)}, 500)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/")
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/api/state")
    def state() -> dict:
        return {
            "version": __version__,
            "dirs": [str(d) for d in settings.dirs.dirs],
            "preview": settings.pipeline is not None,  # else: when the first model is one
            "methods": _methods(),
            "dtypes": ["fp16", "bf16", "fp32"],
        }

    @app.get("/api/models")
    def models() -> list[dict]:
        return [_model_info(str(m.path), m.size, m.modified) for m in settings.dirs.models()]

    @app.get("/api/presets")
    def block_presets(model: str) -> dict[str, list[float]]:
        path = settings.dirs.model(model)
        stat = path.stat()
        info = _model_info(str(path), stat.st_size, stat.st_mtime)
        return _presets(info["architecture"], tuple(info["blocks"]))

    @app.post("/api/dry-run")
    async def dry_run(request: Request) -> dict:
        form = await _json(request)
        recipe, output, overwrite = _merge_request(settings.dirs, form)
        return {"plan": api.dry_run(recipe, output, overwrite), "recipe": recipe.to_yaml()}

    @app.post("/api/recipe")
    async def recipe_yaml(request: Request) -> PlainTextResponse:
        recipe = _recipe(settings.dirs, (await _json(request)).get("recipe"))
        return PlainTextResponse(recipe.to_yaml(), media_type="application/yaml")

    @app.post("/api/recipe/parse")
    async def parse_upload(request: Request) -> dict:
        body = await request.body()
        if len(body) > MAX_UPLOAD:
            raise WeightmixError(f"the upload is {format_size(len(body))}: a recipe is a few kB")
        recipe = _uploaded_recipe(settings.dirs, body)
        return {"recipe": _recipe_data(recipe)}

    @app.post("/api/merge")
    async def merge(request: Request) -> dict:
        form = await _json(request)
        recipe, output, overwrite = _merge_request(settings.dirs, form)
        api.make_plan(recipe, output, overwrite).close()  # refuse now what would fail later
        job = jobs.submit(recipe, output, overwrite)
        return {**job.view(), "ahead": jobs.ahead_of(job)}

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
        row = history.get(merge_id)
        if row is None:
            raise WeightmixError(f"no merge {merge_id} in the history")
        return PlainTextResponse(row["recipe"], media_type="application/yaml")

    @app.post("/api/history/{merge_id}/rerun")
    async def rerun(merge_id: int, request: Request) -> dict:
        row = history.get(merge_id)
        if row is None:
            raise WeightmixError(f"no merge {merge_id} in the history")
        form = await _json(request)
        data = yaml.safe_load(row["recipe"])
        output = str(form.get("output") or row["output"])
        request_form = {"recipe": data, "output": output, "overwrite": form.get("overwrite")}
        recipe, path, overwrite = _merge_request(settings.dirs, request_form)
        api.make_plan(recipe, path, overwrite).close()
        job = jobs.submit(recipe, path, overwrite)
        return {**job.view(), "ahead": jobs.ahead_of(job)}

    @app.post("/api/similarity")
    async def similarity(request: Request) -> Response:
        from weightmix.analysis.similarity import measure_similarity

        paths = [settings.dirs.model(p) for p in (await _json(request)).get("models") or []]
        if len(paths) < 2:
            raise WeightmixError("similarity compares models: pick at least two")
        names = {_name(i): str(p) for i, p in enumerate(paths)}
        return Response(_similarity_png(measure_similarity(names)), media_type="image/png")

    @app.post("/api/preview")
    async def preview(request: Request) -> Response:
        form = await _json(request)
        recipe = _recipe(settings.dirs, form.get("recipe"))
        image = await run_in_threadpool(_preview_png, recipe, form, settings, jobs)
        return Response(image, media_type="image/png")

    return app


def _preview_png(recipe: Recipe, form: dict, settings: Settings, jobs: Jobs) -> bytes:
    """The preview grid of the recipe along one parameter (`weightmix preview`'s grid),
    drawn while no merge runs."""
    import io

    from weightmix.analysis.preview import Sweep, check_sweeps, pipeline_folder, run_preview

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
    folder = pipeline_folder(recipe, settings.pipeline, family)
    with jobs.exclusive:
        grid = run_preview(data, recipe, [sweep], prompt, seed, steps, folder, "cpu", size)
    buffer = io.BytesIO()
    grid.image.save(buffer, format="PNG")
    return buffer.getvalue()


def _integer(form: dict, name: str, low: int, high: int, default: int) -> int:
    value = form.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise WeightmixError(f"preview: {name} is a whole number from {low} to {high}")
    return value


def _authorised(request: Request, auth: tuple[str, str]) -> bool:
    import base64

    header = request.headers.get("authorization", "")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, _, password = base64.b64decode(encoded).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return False
    return secrets.compare_digest(user, auth[0]) & secrets.compare_digest(password, auth[1])


async def _json(request: Request) -> dict:
    try:
        data = await request.json()
    except ValueError:
        raise WeightmixError("the request is not JSON") from None
    if not isinstance(data, dict):
        raise WeightmixError("the request is not a JSON object")
    return data


def _name(index: int) -> str:
    """Model names as the CLI gives them: A, B, ... Z, M26, M27 ..."""
    return chr(ord("A") + index) if index < 26 else f"M{index}"


def _recipe(dirs: ModelDirs, data: Any) -> Recipe:
    """A recipe from the page, every model path checked to lie inside the directories."""
    if not isinstance(data, dict):
        raise WeightmixError("recipe: give a mapping with 'models' and 'merge'")
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        raise WeightmixError("recipe: pick at least one model")
    checked = dict(data)
    checked["models"] = {str(n): str(dirs.model(str(p))) for n, p in models.items()}
    for setting in ("text_encoder", "tokenizer"):
        written = checked.get(setting)
        if written is not None and str(written) not in checked["models"]:
            checked[setting] = str(dirs.resolve(str(written), setting))
    return parse_recipe(checked, "recipe", dirs.first)


def _merge_request(dirs: ModelDirs, form: dict) -> tuple[Recipe, Path, bool]:
    recipe = _recipe(dirs, form.get("recipe"))
    overwrite = bool(form.get("overwrite", False))
    inputs = [recipe.model_path(name).resolve() for name in recipe.models]
    output = dirs.output(str(form.get("output") or ""), inputs, overwrite)
    return recipe, output, overwrite


def _uploaded_recipe(dirs: ModelDirs, body: bytes) -> Recipe:
    """An uploaded YAML file as a recipe: read with the CLI's reader (its limits and
    messages), relative model paths taken from the first models directory."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "upload.yaml"
        path.write_bytes(body)
        try:
            data = read_recipe_data(path)
        except WeightmixError as error:
            raise WeightmixError(str(error).replace(str(path), "the uploaded file")) from None
    models = data.get("models")
    if isinstance(models, dict):
        data["models"] = {n: str((dirs.first / str(p)) if not Path(str(p)).is_absolute()
                                 else p) for n, p in models.items()}  # fmt: skip
    return _recipe(dirs, data)


def _recipe_data(recipe: Recipe) -> dict:
    return yaml.safe_load(recipe.to_yaml())


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
    return {
        **info,
        "architecture": architecture.name if known else "unknown",
        "blocks": list(architecture.blocks) if known else [],
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


def _similarity_png(result: Any) -> bytes:
    """The heatmap `weightmix similarity --plot` draws: cosine against the first model, per
    component and block."""
    from weightmix.analysis.plots import heatmap

    names, groups = list(result.models), list(result.groups)
    values = [[result.groups[g]["models"][m]["cosine"] for g in groups]
              for m in range(len(names) - 1)]  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "similarity.png"
        heatmap(values, names[1:], groups, f"cosine against {names[0]}", path)
        return path.read_bytes()
