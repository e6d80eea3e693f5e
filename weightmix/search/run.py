"""Running a search: an Optuna study in a storage (SQLite beside the search file by default),
trials asked in rounds of `concurrency`, run in this process, in local worker processes, or as
Ray tasks, and told back in trial order, so that the same seed and sampler give the same
trials wherever they run. A trial that fails is recorded with its reason and the search goes
on; a search stopped (Ctrl-C, a crash) resumes from its storage with --resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from weightmix import engine
from weightmix.api import make_plan
from weightmix.errors import WeightmixError, one_line
from weightmix.recipe import parse_recipe
from weightmix.search.objectives import TrialFailed, check_target, score
from weightmix.search.spec import (
    Objective,
    SearchSpec,
    Variable,
    expand_blocks,
    pending_blocks,
)

ERROR_ATTR = "error"  # a failed trial's reason, in its user attributes
VARIABLES_ATTR = "variables"  # the study's variables, to refuse resuming another search
RAY_CONNECT_SECONDS = 30


def need_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise WeightmixError(
            "weightmix search needs Optuna: pip install 'weightmix[search]'"
        ) from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", module=r"optuna(\..*)?$")  # its notes are not errors
    return optuna


@dataclass
class Outcome:
    """How a search run ended."""

    study: Any  # optuna.Study
    ran: int  # trials run now
    stopped: str | None = None  # why it stopped early (time budget ...)


def prepare(spec: SearchSpec) -> None:
    """Validate the search before anything is merged: per-block variables get the models'
    blocks, trials at the ends and middles of the ranges and with each choice are planned
    (headers only: a variable on a parameter the method lacks, a range past what the parameter
    takes ... is refused now), the target fits."""
    if pending_blocks(spec):
        plan = _plan(spec, spec.first_values())
        try:
            expand_blocks(spec, getattr(plan.architecture, "blocks", None))
        finally:
            plan.close()
    for values in corner_values(spec):
        plan = _plan(spec, values)
        blocks = getattr(plan.architecture, "blocks", None)
        plan.close()
        if spec.settings.objective.kind() == "balance" and not blocks:
            raise WeightmixError(
                f"{spec.source}: objective balance compares blocks, and the models'"
                " architecture has none known: use distance, cosine or a callable"
            )
    check_target(spec.trial_data(spec.first_values()), spec.folder, spec.settings.objective)


def corner_values(spec: SearchSpec) -> list[dict[str, Any]]:
    """The trials prepare() plans: every range at its middle, then at its low end and at its
    high end, and each choice of each choice variable with the rest in the middle."""
    middle = spec.first_values()
    found = [middle]
    for end in ("low", "high"):
        found.append(
            middle | {v.name: getattr(v, end) for v in spec.variables if v.choices is None}
        )
    for v in spec.variables:
        found += [middle | {v.name: choice} for choice in (v.choices or ())[1:]]
    return found


def _plan(spec: SearchSpec, values: dict[str, Any]) -> Any:
    data = spec.trial_data(values)
    try:
        return make_plan(parse_recipe(data, str(spec.source), spec.folder))
    except WeightmixError as error:
        shown = ", ".join(f"{name}={_short(value)}" for name, value in values.items())
        raise WeightmixError(f"{error} (with the search variables at {shown})") from None


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, float) else f"{value:g}"
    return text if len(text) <= 40 else text[:37] + "..."


def distributions(spec: SearchSpec) -> dict[str, Any]:
    """Optuna's distribution of each variable; choices that are not plain values (block
    lists, mappings) are searched by their index."""
    optuna = need_optuna()
    found: dict[str, Any] = {}
    for v in spec.variables:
        if v.choices is not None:
            found[v.name] = optuna.distributions.CategoricalDistribution(_choice_keys(v))
        else:
            found[v.name] = optuna.distributions.FloatDistribution(
                v.low, v.high, step=v.step, log=v.log
            )
    return found


def _plain_choice(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _choice_keys(variable: Variable) -> list[Any]:
    assert variable.choices is not None
    if all(_plain_choice(c) for c in variable.choices):
        return list(variable.choices)
    return list(range(len(variable.choices)))


def values_of(spec: SearchSpec, params: dict[str, Any]) -> dict[str, Any]:
    """The recipe values of a trial's Optuna parameters (indexes back to their choices)."""
    values = {}
    for v in spec.variables:
        value = params[v.name]
        if v.choices is not None and not all(_plain_choice(c) for c in v.choices):
            value = v.choices[value]
        values[v.name] = value
    return values


def make_sampler(spec: SearchSpec, offset: int) -> Any:
    optuna = need_optuna()
    seed = spec.settings.seed + offset  # a resumed search does not redraw its first trials
    if spec.settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.settings.sampler == "cmaes":
        if any(v.choices is not None for v in spec.variables):
            raise WeightmixError(
                f"{spec.source}: the cmaes sampler searches numbers only: use tpe or random"
                " with choice variables"
            )
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    return optuna.samplers.TPESampler(seed=seed)


def shown_url(url: str) -> str:
    """A storage URL with any password hidden."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url


def open_study(spec: SearchSpec, resume: bool, overwrite: bool, create: bool = True) -> Any:
    """The search's study: new (refused if one of that name exists, unless --resume or
    --overwrite), or the existing one (create=False: --show), searching the same variables."""
    optuna = need_optuna()
    url, name = spec.storage_url(), spec.study_name()
    shown = shown_url(url)
    direction = spec.settings.objective.goal()
    make_sampler(spec, 0)  # refuses a sampler that cannot search these variables
    database = spec.sqlite_file()
    if not create and database is not None and not database.is_file():
        raise WeightmixError(f"no search {name!r} in {shown}: run it first")
    try:
        storage = optuna.storages.RDBStorage(url)
        names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    except Exception as error:  # a URL SQLAlchemy cannot open, an unreachable server
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise WeightmixError(f"search storage {shown}: cannot open it: {one_line(first)}") from None
    exists = name in names
    if exists and overwrite:
        optuna.delete_study(study_name=name, storage=storage)
        exists = False
    if exists and not resume and create:
        raise WeightmixError(
            f"search {name!r} exists in {shown}: --resume continues it, --overwrite starts again"
        )
    if not exists and not create:
        raise WeightmixError(f"no search {name!r} in {shown}: run it first")
    finished = 0
    if exists:
        study = optuna.load_study(study_name=name, storage=storage)
        finished = len(study.trials)
        stored = study.user_attrs.get(VARIABLES_ATTR)
        if stored is not None and stored != spec.fingerprint():
            raise WeightmixError(
                f"search {name!r} in {shown} searched other variables or ranges than"
                f" {spec.source.name} now marks: --overwrite starts it again, or name a new"
                " study (search.study)"
            )
        if study.direction.name.lower() != direction:
            raise WeightmixError(
                f"search {name!r} in {shown} was run to {study.direction.name.lower()}"
            )
    study = optuna.create_study(
        storage=storage, study_name=name, direction=direction,
        sampler=make_sampler(spec, finished), load_if_exists=True,
    )  # fmt: skip
    if not exists:
        study.set_user_attr(VARIABLES_ATTR, spec.fingerprint())
    return study


def run_trial(
    objective: dict[str, Any], data: dict[str, Any], folder: str, threads: int
) -> tuple[float | None, str | None]:
    """One trial, wherever it runs: (value, None), or (None, why it failed)."""
    try:
        value = score(Objective.model_validate(objective), data, Path(folder), threads)
    except (WeightmixError, TrialFailed) as error:
        return None, one_line(str(error))
    except SystemExit as error:  # the user's objective called sys.exit()
        return None, f"the objective called sys.exit({error.code!r})"
    except Exception as error:  # the user's objective, an out-of-memory ...
        return None, one_line(f"{type(error).__name__}: {error}")
    return value, None


def memory_per_trial(spec: SearchSpec, threads: int) -> int:
    """Bytes a trial holds at most: the engine's peak, and the merged model in memory when
    the objective takes it whole (a callable)."""
    plan = _plan(spec, spec.first_values())
    try:
        peak = engine.estimate_peak(plan, threads=threads)
        kind = spec.settings.objective.kind()
        if kind == "callable":
            peak += plan.output_bytes
        elif kind == "images":  # the merged state, and the pipeline (float32: twice fp16)
            peak += plan.output_bytes + 2 * _pipeline_bytes(spec)
        else:
            peak += 3 * max((k.out_nbytes for k in plan.keys), default=0)
        return peak + (300 << 20)  # torch and the interpreter in a worker process
    finally:
        plan.close()


def _pipeline_bytes(spec: SearchSpec) -> int:
    """The weights files' bytes of the images objective's pipeline folder (0 if unknown)."""
    from weightmix.analysis.preview import pipeline_folder

    images = spec.settings.objective.images
    assert images is not None
    recipe = parse_recipe(spec.trial_data(spec.first_values()), str(spec.source), spec.folder)
    try:
        given = recipe.resolve(images.pipeline) if images.pipeline else None
        folder = pipeline_folder(recipe, given, None)
    except WeightmixError:
        return 0
    weights = (".safetensors", ".bin", ".pt", ".ckpt")
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.suffix in weights)


def available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


SHIP_PIECE = 64 << 20  # bytes of a shipped file per object in Ray's object store


@dataclass(frozen=True)
class Shipped:
    """An input file sent through Ray's object store: its pieces, and the name it gets in a
    node's scratch folder (unique per path, size and modification time)."""

    name: str
    pieces: tuple[Any, ...]  # ray.ObjectRef of each piece, in order
    size: int


def ship_inputs(ray: Any, spec: SearchSpec) -> dict[str, Shipped]:
    """Put each model file (and a distance/cosine target) into Ray's object store, a piece at
    a time (the driver holds one piece); by the path the search file gives."""
    recipe = parse_recipe(spec.trial_data(spec.first_values()), str(spec.source), spec.folder)
    objective = spec.settings.objective
    written = dict(recipe.models)
    target = objective.distance or objective.cosine
    if target is not None:
        written["objective target"] = target
    shipped: dict[str, Shipped] = {}
    for name, text in written.items():
        path = recipe.resolve(text)
        if not path.is_file():
            raise WeightmixError(
                f"ship_inputs sends single files; {name} ({path}) is not one: put it on a file"
                " system every node sees instead"
            )
        stat = path.stat()
        tag = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        pieces = []
        with open(path, "rb") as source:
            while piece := source.read(SHIP_PIECE):
                pieces.append(ray.put(piece))
        shipped[text] = Shipped(f"{tag.hexdigest()[:16]}-{path.name}", tuple(pieces), stat.st_size)
    return shipped


def _receive(shipped: dict[str, Shipped]) -> dict[str, str]:
    """On a Ray worker: each shipped file in this node's scratch folder (written once per
    node, moved into place whole); the path each written path stands for."""
    import ray

    folder = Path(tempfile.gettempdir()) / "weightmix-shipped"
    folder.mkdir(exist_ok=True)
    found = {}
    for written, item in shipped.items():
        path = folder / item.name
        if not path.is_file():
            handle, temporary = tempfile.mkstemp(dir=folder, prefix=".incoming-")
            try:
                with os.fdopen(handle, "wb") as out:
                    for piece in item.pieces:
                        out.write(ray.get(piece))
                # linked only if absent: a copy another trial on this node placed first and
                # may be reading stays as it is (replacing it would look like an input
                # changing under that trial's merge)
                with contextlib.suppress(FileExistsError):
                    os.link(temporary, path)
            finally:
                Path(temporary).unlink(missing_ok=True)
        found[written] = str(path)
    return found


def run_shipped_trial(
    objective: dict[str, Any], data: dict[str, Any], folder: str, threads: int,
    shipped: dict[str, Shipped],
) -> tuple[float | None, str | None]:  # fmt: skip
    """run_trial on a node that reads the inputs from their shipped copies."""
    try:
        local = _receive(shipped)
    except OSError as error:
        return None, one_line(f"receiving the shipped inputs: {error}")
    data = dict(data, models={n: local.get(p, p) for n, p in data["models"].items()})
    objective = {k: local.get(v, v) if k in ("distance", "cosine") else v
                 for k, v in objective.items()}  # fmt: skip
    return run_trial(objective, data, folder, threads)


Job = tuple[dict[str, Any], dict[str, Any], str]  # objective, trial recipe data, its folder
Result = tuple[float | None, str | None]  # the value, or why the trial failed
DIED = "the worker running it died (killed, out of memory, or a crash in native code)"


class TrialRunner:
    """Runs rounds of trials: in this process, local processes or Ray tasks. A worker that
    dies fails its trial (the pool is rebuilt); an interrupted round stops its workers."""

    def __init__(self, concurrency: int, threads: int, ray: Any = None, gpus: float = 0,
                 memory: int = 0, shipped: dict[str, Shipped] | None = None) -> None:  # fmt: skip
        self.concurrency, self.threads, self.ray = concurrency, threads, ray
        self.pool: ProcessPoolExecutor | None = None
        self.remote: Any = None
        self.shipped = shipped
        if ray is not None:
            options: dict[str, Any] = {"num_cpus": threads, "num_gpus": gpus, "max_retries": 0}
            if memory:
                options["memory"] = memory
            task = run_trial if shipped is None else run_shipped_trial
            self.remote = ray.remote(task).options(**options)

    def run(self, jobs: list[Job]) -> list[Result]:
        if self.remote is not None:
            return self._run_ray(jobs)
        if self.concurrency > 1:
            return self._run_pool(jobs)
        return [run_trial(o, d, f, self.threads) for o, d, f in jobs]

    def _run_pool(
        self, jobs: list[tuple[dict, dict, str]]
    ) -> list[tuple[float | None, str | None]]:
        if self.pool is None:
            self.pool = ProcessPoolExecutor(self.concurrency, mp_context=get_context("spawn"))
        futures = [self.pool.submit(run_trial, o, d, f, self.threads) for o, d, f in jobs]
        results: list[Result] = []
        try:
            for future in futures:
                try:
                    results.append(future.result())
                except BrokenProcessPool:
                    results.append((None, DIED))
        except BaseException:
            self.close()
            raise
        if any(error == DIED for _, error in results):
            self.close()  # a new pool for the next round
        return results

    def _run_ray(self, jobs: list[Job]) -> list[Result]:
        ray = self.ray
        extra = () if self.shipped is None else (self.shipped,)
        refs = [self.remote.remote(o, d, f, self.threads, *extra) for o, d, f in jobs]
        results: list[Result] = []
        try:
            for ref in refs:
                try:
                    results.append(ray.get(ref))
                except ray.exceptions.RayError as error:  # a dead worker, an out-of-memory kill
                    first = one_line(str(error).strip().splitlines()[0] if str(error) else "")
                    results.append((None, f"{DIED}: {type(error).__name__}: {first}"[:400]))
        except BaseException:
            for ref in refs:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
            raise
        return results

    def close(self) -> None:
        """Stop the worker processes now (a running merge is not waited for)."""
        pool, self.pool = self.pool, None
        if pool is None:
            return
        for process in list(getattr(pool, "_processes", {}).values()):
            with contextlib.suppress(Exception):
                process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)


def search(
    spec: SearchSpec,
    *,
    resume: bool = False,
    overwrite: bool = False,
    ray: Any = None,
    ray_address: str | None = None,
    workers: int | None = None,
    threads: int = 1,
    echo: Callable[[str], None] = print,
) -> Outcome:
    """Run the search `spec` describes until its trial budget (counting a resumed study's
    trials) or time budget is spent. Trials run as Ray tasks with `ray` (the ray module,
    initialised) or `ray_address` (connected once the search file is checked). Raises
    WeightmixError when no trial scored."""
    optuna = need_optuna()
    if spec.settings.ship_inputs and ray is None and ray_address is None:
        raise WeightmixError(f"{spec.source}: search.ship_inputs needs --ray (trials on Ray)")
    prepare(spec)
    settings = spec.settings
    per_trial = memory_per_trial(spec, threads)
    if ray_address is not None:
        ray = connect_ray(ray_address)
    if ray is not None:
        check_ray_resources(ray, threads, settings.gpus, per_trial)
    study = open_study(spec, resume, overwrite)
    for trial in study.trials:  # trials a stopped run left running (no reason: interrupted)
        if trial.state == optuna.trial.TrialState.RUNNING:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    concurrency = workers or settings.workers
    if ray is None:
        free = available_memory()
        if free is not None and concurrency > 1:
            fits = max(1, int(free * 0.8) // per_trial)
            if fits < concurrency:
                echo(f"note: {fits} trial(s) at once, not {concurrency}: each needs about"
                     f" {per_trial >> 20} MB and {free >> 20} MB are free")  # fmt: skip
                concurrency = fits
    shipped = ship_inputs(ray, spec) if settings.ship_inputs else None
    runner = TrialRunner(concurrency, threads, ray, settings.gpus, per_trial if ray else 0,
                         shipped)  # fmt: skip
    spaces = distributions(spec)
    objective = settings.objective.model_dump(exclude_none=True)
    began, ran = time.monotonic(), 0
    stopped = None
    try:
        while (done := len(study.trials)) < settings.trials:
            if settings.timeout is not None and time.monotonic() - began > settings.timeout:
                stopped = f"the time budget of {settings.timeout:g} s is spent"
                break
            trials = [study.ask(spaces) for _ in range(min(concurrency, settings.trials - done))]
            jobs = [
                (objective, spec.trial_data(values_of(spec, t.params)), str(spec.folder))
                for t in trials
            ]
            try:
                results = runner.run(jobs)
            except BaseException:
                for trial in trials:
                    trial.set_user_attr(ERROR_ATTR, "interrupted")
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                raise
            for trial, (value, error) in zip(trials, results):
                ran += 1
                if error is None:
                    study.tell(trial, value)
                    echo(f"trial {trial.number}: {value:.6g}")
                else:
                    trial.set_user_attr(ERROR_ATTR, error)
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    echo(f"trial {trial.number} failed: {error}")
            _give_up_if_all_failed(study, settings.give_up_after)
    finally:
        runner.close()
    if best_values(spec, study) is None:
        failed = [t for t in study.trials if t.state.name == "FAIL"]
        reason = failed[0].user_attrs.get(ERROR_ATTR, "interrupted") if failed else "none ran"
        raise WeightmixError(f"no trial of {len(study.trials)} scored; the first: {reason}")
    return Outcome(study, ran, stopped)


def check_ray_resources(ray: Any, threads: int, gpus: float, memory: int) -> None:
    """Some node of the cluster can run a trial (CPUs, GPUs, memory), or WeightmixError: Ray
    would wait for such a node forever."""
    needs = {"CPU": float(threads), "GPU": float(gpus), "memory": float(memory)}
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(all(node.get(k, 0.0) >= v for k, v in needs.items() if v) for node in nodes):
        return
    largest = {k: max((node.get(k, 0.0) for node in nodes), default=0.0) for k in needs}
    raise WeightmixError(
        f"no node of the Ray cluster has what a trial needs: {threads} CPU(s) (--threads),"
        f" {gpus:g} GPU(s) (search.gpus), {memory >> 20} MB; the largest node has"
        f" {largest['CPU']:g} CPUs, {largest['GPU']:g} GPUs, {int(largest['memory']) >> 20} MB"
    )


def _give_up_if_all_failed(study: Any, first: int) -> None:
    trials = study.trials
    if len(trials) < first or any(t.value is not None for t in trials):
        return
    if all(t.state.name == "FAIL" for t in trials[:first]):
        reason = trials[0].user_attrs.get(ERROR_ATTR, "no reason recorded")
        raise WeightmixError(f"the first {first} trials all failed; the first: {reason}")


def connect_ray(address: str) -> Any:
    """The ray module, connected to `address` ('auto', 'local', or host:port / ray://...);
    WeightmixError when it cannot be, before any merge runs."""
    try:
        import ray
    except ImportError:
        raise WeightmixError("--ray needs Ray: pip install 'weightmix[ray]'") from None
    if ray.is_initialized():
        return ray
    if address not in ("auto", "local"):
        _reachable(address)  # nobody listening: said at once
        _probe(address)  # a port that is not a Ray head would make ray.init end the process
    try:
        if address == "local":
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     logging_level="ERROR")  # fmt: skip
        else:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     logging_level="ERROR")  # fmt: skip
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise WeightmixError(
            f"--ray {address}: cannot connect: {one_line(first).split('. ')[0]}"
            " (is a Ray cluster running there? `ray start --head` starts one)"
        ) from None
    return ray


def _probe(address: str) -> None:
    """Connect to `address` from a child process first, for at most RAY_CONNECT_SECONDS:
    ray.init on a port where no Ray head answers retries for a minute and then ends the
    process it runs in."""
    code = (
        "import sys, ray\n"
        "ray.init(address=sys.argv[1], include_dashboard=False, log_to_driver=False,"
        " logging_level='ERROR')\n"
    )
    try:
        probe = subprocess.run([sys.executable, "-c", code, address], capture_output=True,
                               text=True, timeout=RAY_CONNECT_SECONDS)  # fmt: skip
    except subprocess.TimeoutExpired:
        probe = None
    if probe is None or probe.returncode != 0:
        lines = [] if probe is None else (probe.stderr or "").strip().splitlines()
        said = f": {one_line(lines[-1])[:200]}" if lines else ""
        raise WeightmixError(
            f"--ray {address}: no Ray cluster answered there within {RAY_CONNECT_SECONDS} s"
            f"{said} (is that the head's GCS address, port 6379 by default?)"
        )


def _reachable(address: str) -> None:
    """A Ray head's address (host:port, or ray://host:port for Ray Client) answers a TCP
    connection within 5 s, or WeightmixError."""
    text = address.removeprefix("ray://")
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise WeightmixError(
            f"--ray {address}: give 'auto', 'local', or the head's HOST:PORT (ray://HOST:PORT"
            " for Ray Client)"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as error:
        raise WeightmixError(
            f"--ray {address}: cannot connect: {error.strerror or error} (is a Ray cluster"
            " running there? `ray start --head` starts one)"
        ) from None


def best_values(spec: SearchSpec, study: Any) -> dict[str, Any] | None:
    complete = [t for t in study.trials if t.value is not None and math.isfinite(t.value)]
    if not complete:
        return None
    return values_of(spec, study.best_trial.params)
