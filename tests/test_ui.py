"""`weightmix ui` (issue 15): the server's API on tiny models (paths kept inside the models
directories, merges queued one at a time and cancelled without a trace, errors as one line, the
history in SQLite, the bytes of `weightmix merge`), the command's bad input, and the page in a
real headless Chromium driven by Selenium."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from helpers import random_state, save
from test_preview import loadable_pipelines  # noqa: F401 (a fixture)

from weightmix.ui import jobs as jobs_module
from weightmix.ui.app import Settings, create_app
from weightmix.ui.history import FILE_NAME, History
from weightmix.ui.library import ModelDirs


@pytest.fixture
def library(tmp_path: Path) -> Path:
    """A models directory with three tiny fp16 SD1.5-layout models A, B, C."""
    folder = tmp_path / "models"
    folder.mkdir()
    for name, seed in (("A", 1), ("B", 2), ("C", 3)):
        save(folder / f"{name}.safetensors", random_state(seed, torch.float16))
    return folder


LOCAL = "http://127.0.0.1:7870"  # the Host the UI serves (TestClient's default is refused)
YAML = {"Content-Type": "application/yaml"}


def serve(library: Path, **settings: object) -> TestClient:
    app = create_app(Settings(ModelDirs([library]), **settings))
    return TestClient(app, base_url=LOCAL, raise_server_exceptions=False)


@pytest.fixture
def client(library: Path):
    with serve(library) as c:
        yield c


def recipe(library: Path, *names: str, **params: object) -> dict:
    letters = [chr(ord("A") + i) for i in range(len(names))]
    return {
        "models": {letter: str(library / f"{n}.safetensors") for letter, n in zip(letters, names)},
        "merge": {"method": params.pop("method", "weighted_sum"), "inputs": letters, **params},
    }


def wait(client: TestClient, job: dict, timeout: float = 60) -> dict:
    ends = time.monotonic() + timeout
    while job["status"] in ("queued", "running"):
        assert time.monotonic() < ends, job
        time.sleep(0.05)
        job = client.get(f"/api/jobs/{job['id']}").json()
    return job


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_models_are_listed_with_their_architecture_blocks_dtype_and_size(client, library):
    found = {Path(m["path"]).name: m for m in client.get("/api/models").json()}
    assert set(found) == {"A.safetensors", "B.safetensors", "C.safetensors"}
    model = found["A.safetensors"]
    assert model["architecture"] == "sd1" and model["dtype"] == "F16"
    assert model["blocks"][:2] == ["BASE", "IN00"] and len(model["blocks"]) == 26
    assert "diffuser" in model["components"] and "self_attention" in model["layers"]
    assert model["size"] == (library / "A.safetensors").stat().st_size
    presets = client.get("/api/presets", params={"model": model["path"]}).json()
    assert presets["GRAD_V"][0] == 0 and len(presets["GRAD_V"]) == 26
    methods = {m["name"]: m for m in client.get("/api/state").json()["methods"]}
    alpha = next(p for p in methods["weighted_sum"]["params"] if p["name"] == "alpha")
    assert alpha["numeric"]
    density = next(p for p in methods["ties"]["params"] if p["name"] == "density")
    assert density["maximum"] == 1


def test_paths_outside_the_models_directories_are_refused(client, library, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(library / "A.safetensors", outside)
    (library / "link.safetensors").symlink_to(outside)  # a link inside that leads out
    names = {Path(m["path"]).name for m in client.get("/api/models").json()}
    assert "link.safetensors" not in names
    before = listing(library)
    good = recipe(library, "A", "B", alpha=0.5)
    cases = [
        ({**good, "models": {"A": str(outside), "B": good["models"]["B"]}}, "x.safetensors",
         "outside the models directories"),
        ({**good, "models": {"A": str(library / "link.safetensors"), "B": good["models"]["B"]}},
         "x.safetensors", "outside the models directories"),
        ({**good, "models": {"A": str(library / ".." / "outside.safetensors"),
                             "B": good["models"]["B"]}}, "x.safetensors", "'..' is not allowed"),
        (good, "../x.safetensors", "'..' is not allowed"),
        (good, str(tmp_path / "x.safetensors"), "outside the models directories"),
        (good, "A.safetensors", "one of the merge's inputs"),
        (good, "x.txt", "name a .safetensors file"),
    ]  # fmt: skip
    for body, output, message in cases:
        for endpoint in ("/api/dry-run", "/api/merge"):
            answer = client.post(endpoint, json={"recipe": body, "output": output})
            assert answer.status_code == 400 and message in answer.json()["error"], (output, answer)
    (library / "exists.safetensors").write_bytes(b"")
    answer = client.post("/api/merge", json={"recipe": good, "output": "exists.safetensors"})
    assert answer.status_code == 400 and "tick 'overwrite'" in answer.json()["error"]
    assert listing(library) == before | {"exists.safetensors"}
    assert (library / "exists.safetensors").read_bytes() == b""


def test_a_merge_in_the_ui_writes_the_bytes_of_the_cli(client, library, tmp_path, run):
    body = {"recipe": recipe(library, "A", "B", alpha="GRAD_V"), "output": "merged.safetensors"}
    shown = client.post("/api/dry-run", json=body).json()
    assert "plan:" in shown["plan"] and "per block" in shown["plan"]
    job = wait(client, client.post("/api/merge", json=body).json())
    assert job["status"] == "done" and job["progress"] == 1.0
    output = library / "merged.safetensors"
    from_ui = output.read_bytes()
    output.unlink()
    recipe_file = tmp_path / "shown.yaml"
    recipe_file.write_text(shown["recipe"])
    assert run("merge", recipe_file, "-o", output).code == 0
    assert output.read_bytes() == from_ui
    row = client.get("/api/history").json()[0]
    assert row["status"] == "done" and row["output"] == str(output)
    assert [i["name"] for i in row["inputs"]] == ["A", "B"] and all(
        len(i["fingerprint"]) == 64 for i in row["inputs"]
    )
    assert yaml.safe_load(client.get(f"/api/history/{row['id']}/recipe.yaml").text) == (
        yaml.safe_load(shown["recipe"])
    )


@pytest.fixture
def held(monkeypatch):
    """Merges stop in their first progress step until `release` is set (the test then sees
    one running and the next queued)."""
    release, reached = threading.Event(), threading.Event()
    original = jobs_module.JobProgress.start

    def start(self, tensors, nbytes):
        reached.set()
        assert release.wait(60)
        original(self, tensors, nbytes)

    monkeypatch.setattr(jobs_module.JobProgress, "start", start)
    return release, reached


def test_one_merge_runs_at_a_time_and_others_queue(client, library, held):
    release, reached = held
    first = client.post("/api/merge", json={"recipe": recipe(library, "A", "B", alpha=0.3),
                                            "output": "one.safetensors"}).json()  # fmt: skip
    assert reached.wait(60)
    second = client.post("/api/merge", json={"recipe": recipe(library, "B", "C", alpha=0.6),
                                             "output": "two.safetensors"}).json()  # fmt: skip
    assert second["status"] == "queued" and second["ahead"] == 1
    assert client.get(f"/api/jobs/{first['id']}").json()["status"] == "running"
    assert client.get(f"/api/jobs/{second['id']}").json()["status"] == "queued"
    release.set()
    assert wait(client, first)["status"] == wait(client, second)["status"] == "done"
    assert (library / "one.safetensors").is_file() and (library / "two.safetensors").is_file()


def test_a_cancelled_merge_leaves_nothing(client, library, held):
    release, reached = held
    before = listing(library)
    running = client.post("/api/merge", json={"recipe": recipe(library, "A", "B"),
                                              "output": "running.safetensors"}).json()  # fmt: skip
    assert reached.wait(60)
    waiting = client.post("/api/merge", json={"recipe": recipe(library, "A", "C"),
                                              "output": "waiting.safetensors"}).json()  # fmt: skip
    stopping = client.post(f"/api/jobs/{running['id']}/cancel", json={}).json()
    assert stopping["status"] == "running"  # it stops at its next step
    dropped = client.post(f"/api/jobs/{waiting['id']}/cancel", json={}).json()
    assert dropped["status"] == "cancelled"  # a queued merge is cancelled at once
    again = client.post("/api/merge", json={"recipe": recipe(library, "A", "C"),
                                            "output": "waiting.safetensors"}).json()  # fmt: skip
    assert again["status"] == "queued"  # its output is free again
    client.post(f"/api/jobs/{again['id']}/cancel", json={})
    release.set()
    assert wait(client, running)["status"] == "cancelled"
    assert wait(client, waiting)["message"] == "cancelled before it started"
    assert listing(library) == before | {FILE_NAME}  # no output, no temporary file


def test_errors_reach_the_browser_as_one_line_and_the_details_go_to_the_log(
    client, library, monkeypatch, caplog
):
    from weightmix.ui import app as app_module

    def broken(*args, **kwargs):
        raise RuntimeError("deep inside\nline two")

    monkeypatch.setattr(app_module, "describe_plan", broken)
    answer = client.post("/api/dry-run", json={"recipe": recipe(library, "A", "B"),
                                               "output": "x.safetensors"})  # fmt: skip
    assert answer.status_code == 500
    assert answer.json() == {"error": "internal error (RuntimeError); the details are in the"
                                      " server's log"}  # fmt: skip
    assert "Traceback" not in answer.text and "deep inside" not in answer.text
    assert any("deep inside" in (r.exc_text or "") for r in caplog.records)
    # a merge that fails while running (fp16 overflow): its one line, and no output
    body = {"recipe": {**recipe(library, "A", "B", weights=[3e4, -3e4], normalize=False),
                       "dtype": "fp16"}, "output": "overflow.safetensors"}  # fmt: skip
    job = wait(client, client.post("/api/merge", json=body).json())
    assert job["status"] == "failed" and "overflowed" in job["message"]
    assert "\n" not in job["message"] and not (library / "overflow.safetensors").exists()
    assert client.get("/api/history").json()[0]["status"] == "failed"


def test_uploads_that_are_not_recipes_are_refused(client, library):
    cases = [
        (b"models: [1, 2", "not valid YAML"),
        (b"- a list\n", "a recipe is a YAML mapping"),
        (b"\xff\xfe", "is not a text file"),
        (b"models: {A: /etc/hostname}\nmerge: A\n", "outside the models directories"),
        (b"models: {A: ../A.safetensors}\nmerge: A\n", "'..' is not allowed"),
        (b"x" * (2 << 20), "a recipe is a few kB"),
    ]
    for body, message in cases:
        answer = client.post("/api/recipe/parse", content=body, headers=YAML)
        assert answer.status_code == 400 and message in answer.json()["error"], (body[:40], answer)
        assert "upload.yaml" not in answer.text  # the server's temporary name is not shown
    good = b"models: {A: A.safetensors, B: B.safetensors}\nmerge: {method: add, inputs: [A, B]}\n"
    found = client.post("/api/recipe/parse", content=good, headers=YAML).json()["recipe"]
    assert found["models"] == {"A": str(library / "A.safetensors"),
                               "B": str(library / "B.safetensors")}  # fmt: skip
    assert found["merge"]["method"] == "add"


def test_the_history_lives_in_the_first_models_directory(library):
    with serve(library) as client:
        body = {"recipe": recipe(library, "A", "B"), "output": "h.safetensors"}
        wait(client, client.post("/api/merge", json=body).json())
    left = History(library)
    left.add("models: {}", "left.safetensors")  # queued when a server stopped
    left.close()
    assert (library / FILE_NAME).is_file()
    with serve(library) as client:
        rows = client.get("/api/history").json()
    assert [r["status"] for r in rows] == ["interrupted", "done"]
    assert rows[1]["output"] == str(library / "h.safetensors")


@pytest.mark.parametrize("password", ["secret", "pässwörd"])
def test_a_password_guards_every_page(library, password):
    with serve(library, auth=("ann", password)) as client:
        assert client.get("/api/models").status_code == 401
        assert client.get("/", auth=("ann", "wrong")).status_code == 401
        assert client.get("/", auth=("änn", password)).status_code == 401
        assert client.get("/api/models", auth=("ann", password)).status_code == 200


def test_the_command_refuses_bad_settings_in_one_line(run, tmp_path, library):
    result = run("ui", "--models-dir", tmp_path / "missing")
    assert result.code == 2 and "does not exist" in result.err and "Traceback" not in result.err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run("ui", "--models-dir", library, "--port", port)
    assert result.code == 2 and f"port {port} is in use" in result.err and "--port " in result.err
    assert run("ui", "--models-dir", library, "--auth", "nopassword").code == 2
    result = run("ui", "--models-dir", library, "--listen", "example.org")
    assert result.code == 2 and "give an IP address" in result.err


# ---- the page in a real browser ----

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
ARTIFACTS = Path(os.environ.get("WEIGHTMIX_TEST_ARTIFACTS", "test-artifacts")) / "ui"


@pytest.fixture
def server(library):
    """The UI served on a free port of 127.0.0.1 from a thread of this process."""
    import uvicorn

    from weightmix.ui.commands import bind

    listener = bind("127.0.0.1", 0)
    app = create_app(Settings(ModelDirs([library])))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    ends = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < ends and thread.is_alive(), "the UI server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/"
    server.should_exit = True
    thread.join(30)


@pytest.fixture
def browser():
    if CHROMIUM is None or DRIVER is None:
        pytest.skip(
            "needs Debian's chromium and chromium-driver packages (`make test` installs them"
            " with apt-get; as root: apt-get install -y chromium chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--window-size=1400,1800"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def test_the_page_merges_uploads_and_reports_in_a_real_browser(
    server, browser, library, tmp_path, run
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    find = lambda element_id: browser.find_element(By.ID, element_id)  # noqa: E731
    until = WebDriverWait(browser, 60).until
    browser.get(server)
    until(lambda _: find("version").text.startswith("v") and find("pick-2"))
    # two models, alpha per block from a preset with two blocks moved by hand
    find("pick-0").click()
    find("pick-1").click()
    until(lambda _: "weighted_sum(A, B)" in find("plan").text)
    find("pb-alpha").click()
    until(lambda _: len(Select(find("preset-alpha")).options) > 1)
    Select(find("preset-alpha")).select_by_value("GRAD_V")
    browser.execute_script("""
        for (const [id, v] of [["b-alpha-M00", 0.25], ["b-alpha-OUT11", 0.5]]) {
          const s = document.getElementById(id); s.value = v;
          s.dispatchEvent(new Event("input"));
        }""")
    until(lambda _: "0.25" in find("recipe").text and "per block" in find("plan").text)
    find("add-rule").click()  # a rule by blocks: OUT00-OUT05 take alpha 0.1
    browser.find_element(By.CSS_SELECTOR, "#rules .rule-blocks").send_keys("OUT00-OUT05")
    browser.find_element(By.CSS_SELECTOR, "#rules .rule-params").send_keys("alpha=0.1")
    until(lambda _: "OUT00-OUT05" in find("recipe").get_attribute("textContent"))
    output = find("output")
    output.clear()
    output.send_keys("browser.safetensors")
    until(lambda _: "browser.safetensors" in find("plan").text)
    shown = yaml.safe_load(find("recipe").get_attribute("textContent"))
    assert shown["merge"]["alpha"][13] == 0.25 and shown["merge"]["alpha"][25] == 0.5
    assert shown["merge"]["alpha"][1] == 1.0  # GRAD_V's IN00
    assert shown["rules"] == [{"blocks": "OUT00-OUT05", "params": {"alpha": 0.1}}]
    find("run").click()
    try:
        until(lambda _: find("status").get_attribute("data-status") in ("done", "failed")
              or find("error").text)  # fmt: skip
    except Exception:
        browser.save_screenshot(str(ARTIFACTS / "stuck.png"))
        shown = [find("status").text, find("error").text, str(browser.get_log("browser"))]
        raise AssertionError(" | ".join(shown)) from None
    browser.save_screenshot(str(ARTIFACTS / "merged.png"))
    assert find("status").get_attribute("data-status") == "done", find("error").text
    merged = library / "browser.safetensors"
    from_ui = merged.read_bytes()
    merged.unlink()
    (tmp_path / "shown.yaml").write_text(yaml.safe_dump(shown))
    assert run("merge", tmp_path / "shown.yaml", "-o", merged).code == 0
    assert merged.read_bytes() == from_ui
    until(lambda _: "browser.safetensors" in find("history").text)
    # a recipe uploaded fills the form
    upload = tmp_path / "upload.yaml"
    upload.write_text(yaml.safe_dump({
        "models": {"X": str(library / "C.safetensors"), "Y": str(library / "A.safetensors"),
                   "Z": str(library / "B.safetensors")},
        "merge": {"method": "add_difference", "inputs": ["X", "Y", "Z"], "alpha": 0.7},
    }))  # fmt: skip
    find("upload-recipe").send_keys(str(upload))
    until(lambda _: Select(find("method")).first_selected_option.text == "add_difference")
    until(lambda _: find("p-alpha").get_attribute("value") == "0.7")
    rows = browser.find_elements(By.CSS_SELECTOR, "#model-list tbody tr")
    cells = [[cell.text for cell in r.find_elements(By.TAG_NAME, "td")] for r in rows]
    letters = {row[2]: row[1] for row in cells}  # model file -> its letter in the merge
    assert [letters[f"{n}.safetensors"] for n in "CAB"] == ["A", "B", "C"]
    until(lambda _: "exists: choose another name" in find("error").text)  # browser.safetensors
    output.clear()
    output.send_keys("uploaded.safetensors")
    until(lambda _: "add_difference(X, Y, Z)" in find("plan").text and not find("error").text)
    browser.save_screenshot(str(ARTIFACTS / "uploaded.png"))
    # settings the form has no field for, and a preset, stay as uploaded
    upload.write_text(yaml.safe_dump({
        "models": {"A": str(library / "A.safetensors"), "B": str(library / "B.safetensors")},
        "merge": {"method": "weighted_sum", "inputs": ["A", "B"], "alpha": "GRAD_V"},
        "seed": 7, "title": "from an upload", "rounding": "stochastic",
    }))  # fmt: skip
    find("upload-recipe").send_keys(str(upload))
    until(lambda _: "from an upload" in find("recipe").get_attribute("textContent"))
    shown = yaml.safe_load(find("recipe").get_attribute("textContent"))
    assert shown["merge"]["alpha"] == "GRAD_V" and shown["seed"] == 7
    assert shown["rounding"] == "stochastic"
    # bad input: an output outside the models directory is refused, with its line shown
    output.clear()
    output.send_keys("../evil.safetensors")
    find("run").click()
    until(lambda _: "'..' is not allowed" in find("error").text)
    browser.save_screenshot(str(ARTIFACTS / "refused.png"))
    assert not (library.parent / "evil.safetensors").exists()
    assert "Traceback" not in browser.page_source


def test_a_preview_grid_of_pipeline_folders(tmp_path, loadable_pipelines):  # noqa: F811
    """Diffusers pipeline folders in the models directory are models too; the grid along a
    parameter is `weightmix preview`'s."""
    from PIL import Image

    from weightmix.analysis.preview import LABEL

    folder = tmp_path / "pipelines"
    for pipeline in loadable_pipelines:
        shutil.copytree(pipeline, folder / pipeline.name)
    with serve(folder) as client:
        listed = {Path(m["path"]).name: m for m in client.get("/api/models").json()}
        assert set(listed) == {"A", "B"} and listed["A"]["size"] > 0
        merged = {"models": {"A": str(folder / "A"), "B": str(folder / "B")},
                  "merge": {"method": "weighted_sum", "inputs": ["A", "B"]}}  # fmt: skip
        body = {"recipe": merged, "param": "alpha", "values": [0, 1], "prompt": "a cat",
                "steps": 5, "size": 32}  # fmt: skip
        answer = client.post("/api/preview", json=body)
        assert answer.status_code == 200, answer.text
        image = Image.open(__import__("io").BytesIO(answer.content))
        assert image.size == (2 * 32, LABEL + 32)
        # pipelines merge into a pipeline folder: an output name without a suffix
        planned = client.post("/api/dry-run", json={"recipe": merged, "output": "merged-pipe"})
        assert planned.status_code == 200, planned.text
        body_pipe = {"recipe": merged, "output": "merged-pipe"}
        job = wait(client, client.post("/api/merge", json=body_pipe).json())
        assert job["status"] == "done" and (folder / "merged-pipe" / "model_index.json").is_file()
        for change, message in (({"prompt": " "}, "write a prompt"),
                                ({"values": []}, "give 1 to 8 values"),
                                ({"steps": 0}, "steps is a whole number")):  # fmt: skip
            answer = client.post("/api/preview", json={**body, **change})
            assert answer.status_code == 400 and message in answer.json()["error"]


def test_a_merge_from_the_history_runs_again(client, library):
    body = {"recipe": recipe(library, "A", "C", alpha=0.25), "output": "again.safetensors"}
    first = wait(client, client.post("/api/merge", json=body).json())
    output = library / "again.safetensors"
    written = output.read_bytes()
    answer = client.post(f"/api/history/{first['id']}/rerun", json={})
    assert answer.status_code == 400 and "tick 'overwrite'" in answer.json()["error"]
    again = wait(client, client.post(f"/api/history/{first['id']}/rerun",
                                      json={"overwrite": True}).json())  # fmt: skip
    assert again["status"] == "done" and again["id"] != first["id"]
    assert output.read_bytes() == written
    assert client.post("/api/history/999/rerun", json={}).status_code == 400


def test_the_demo_opens_on_the_example_models(run, tmp_path, monkeypatch):
    import uvicorn

    served = []  # the address of each socket the server was given
    monkeypatch.setattr(uvicorn.Server, "run",
                        lambda self, sockets: served.append(sockets[0].getsockname()))  # fmt: skip
    monkeypatch.chdir(tmp_path)
    result = run("ui", "--demo", "--port", 0)
    assert result.code == 0 and "http://127.0.0.1:" in result.out
    assert {p.name for p in (tmp_path / "demo").glob("*.safetensors")} == {
        "base.safetensors", "anime.safetensors", "photo.safetensors"}  # fmt: skip
    assert len(served) == 1 and served[0][0] == "127.0.0.1"
    result = run("ui", "--models-dir", tmp_path / "demo", "--port", 0, "--listen", "0.0.0.0")
    assert result.code == 0 and "warning: serving on 0.0.0.0" in result.err
    assert served[1][0] == "0.0.0.0"
    result = run("ui", "--port", 0)  # nothing configured: the current folder
    assert result.code == 0 and f"models: {tmp_path.resolve()};" in result.out


def test_requests_another_site_can_send_are_refused(client, library):
    """A page of another site may POST text/plain or a form without asking the browser (a
    'simple' request), or reach the UI through a DNS name bound to 127.0.0.1: none of these
    starts anything or reads the history."""
    (library / "mine.safetensors").write_bytes((library / "C.safetensors").read_bytes())
    before = (library / "mine.safetensors").read_bytes()
    body = json.dumps({"recipe": recipe(library, "A", "B"), "output": "mine.safetensors",
                       "overwrite": True})  # fmt: skip
    for headers, status in (({"Content-Type": "text/plain"}, 415),
                            ({"Content-Type": "application/x-www-form-urlencoded"}, 415),
                            ({"Content-Type": "application/json",
                              "Origin": "http://evil.example"}, 403),
                            ({"Content-Type": "application/json",
                              "Host": "evil.example:7870"}, 403)):  # fmt: skip
        answer = client.post("/api/merge", content=body, headers=headers)
        assert answer.status_code == status and "error" in answer.json()
    assert client.get("/api/history", headers={"Host": "evil.example:7870"}).status_code == 403
    assert client.get("/api/history").json() == []
    time.sleep(0.5)
    assert (library / "mine.safetensors").read_bytes() == before
    same_site = {"Content-Type": "application/json", "Origin": LOCAL}
    assert client.post("/api/dry-run", content=body, headers=same_site).status_code == 200


def test_files_a_recipe_reads_stay_inside_the_models_directories(client, library, tmp_path):
    """Not only the paths the page names: a shard index's shards, a tokenizer folder's files
    and a text encoder are checked, and the output is never the text encoder."""
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(library / "A.safetensors", outside / "secret.safetensors")
    (library / "evil-00001-of-00001.safetensors").symlink_to(outside / "secret.safetensors")
    index = {"weight_map": {"w": "evil-00001-of-00001.safetensors"}}
    (library / "evil.safetensors.index.json").write_text(json.dumps(index))
    tokenizer = library / "tokenizer"
    tokenizer.mkdir()
    (outside / "vocab.json").write_text("{}")
    (tokenizer / "vocab.json").symlink_to(outside / "vocab.json")
    (library / "B").symlink_to(outside, target_is_directory=True)
    good = recipe(library, "A", "B")
    cases = [
        ({**good, "models": {"A": str(library / "evil.safetensors.index.json"),
                             "B": good["models"]["B"]}}, "not a model file"),
        ({**good, "tokenizer": "tokenizer"}, "leads outside the models directories"),
        ({**good, "tokenizer": "B"}, "outside the models directories"),  # a link named B
        ({**good, "text_encoder": ["x"]}, "give a path as a text"),
    ]  # fmt: skip
    for body, message in cases:
        answer = client.post("/api/dry-run", json={"recipe": body, "output": "x.safetensors"})
        assert answer.status_code == 400 and message in answer.json()["error"], answer.text
    shutil.copy(library / "C.safetensors", library / "te.safetensors")
    encoder = {**good, "text_encoder": "te.safetensors"}
    answer = client.post("/api/merge", json={"recipe": encoder, "output": "te.safetensors",
                                             "overwrite": True})  # fmt: skip
    assert answer.status_code == 400 and "one of the merge's inputs" in answer.json()["error"]
    for form in ({"overwrite": "false"}, {"output": 5}):
        answer = client.post("/api/merge", json={"recipe": good, "output": "y.safetensors", **form})
        assert answer.status_code == 400
    huge = "99999999999999999999999"
    for path in (f"/api/jobs/{huge}", f"/api/history/{huge}/recipe.yaml", "/api/jobs/x",
                 "/api/presets"):  # fmt: skip
        answer = client.get(path)
        assert answer.status_code == 400 and "Traceback" not in answer.text, path
    deep = b'{"recipe": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    answer = client.post("/api/dry-run", content=deep, headers={"Content-Type": "application/json"})
    assert answer.status_code == 400 and "not JSON" in answer.json()["error"]
    answer = client.post("/api/similarity", json={"models": 5})
    assert answer.status_code == 400


def test_similarity_draws_the_heatmap(client, library):
    paths = [str(library / f"{n}.safetensors") for n in "ABC"]
    answer = client.post("/api/similarity", json={"models": paths})
    assert answer.status_code == 200 and answer.content.startswith(b"\x89PNG")
    answer = client.post("/api/similarity", json={"models": paths[:1]})
    assert answer.status_code == 400 and "at least two" in answer.json()["error"]


def test_the_worker_outlives_a_locked_history_and_one_output_is_written_once(client, library, held):
    import sqlite3

    release, reached = held
    body = {"recipe": recipe(library, "A", "B"), "output": "locked.safetensors"}
    first = client.post("/api/merge", json=body).json()
    assert reached.wait(60)
    answer = client.post("/api/merge", json=body)  # the same output, queued twice
    assert answer.status_code == 400 and "writes it already" in answer.json()["error"]
    other = sqlite3.connect(library / FILE_NAME, timeout=0)
    other.execute("BEGIN EXCLUSIVE")  # another program holds the history
    release.set()
    done = wait(client, first)
    other.rollback()
    other.close()
    assert done["status"] == "done" and (library / "locked.safetensors").is_file()
    later = {"recipe": recipe(library, "B", "C"), "output": "later.safetensors"}
    assert wait(client, client.post("/api/merge", json=later).json())["status"] == "done"


def test_an_unusable_history_is_one_line(run, library):
    (library / FILE_NAME).write_bytes(b"not a database" * 100)
    result = run("ui", "--models-dir", library, "--port", 0)
    assert result.code == 2 and "merge history" in result.err and "Traceback" not in result.err


def test_links_inside_folders_and_indexes_that_lead_out_are_refused(
    client,
    library,
    tmp_path,
    loadable_pipelines,  # noqa: F811
    run,
):
    """Links in sub-folders (a pipeline's component, a tokenizer's folder) and the shards of a
    text encoder given as an index: checked before anything is opened (a second review)."""
    outside = tmp_path / "outside"
    shutil.copytree(loadable_pipelines[0], outside / "pipeline")
    pipeline = library / "pipe"
    pipeline.mkdir()
    for part in (outside / "pipeline").iterdir():
        target = pipeline / part.name
        if part.name == "unet":
            target.symlink_to(part, target_is_directory=True)  # a component that leads out
        elif part.is_dir():
            shutil.copytree(part, target)
        else:
            shutil.copy(part, target)
    assert "pipe" not in {Path(m["path"]).name for m in client.get("/api/models").json()}
    body = {"recipe": {**recipe(library, "A", "B"), "models": {"A": str(pipeline)}},
            "output": "p"}  # fmt: skip
    answer = client.post("/api/dry-run", json=body)
    assert answer.status_code == 400 and "leads outside" in answer.json()["error"]
    (library / "tok").mkdir()
    (library / "tok" / "inner").symlink_to(outside, target_is_directory=True)
    body = {"recipe": {**recipe(library, "A", "B"), "tokenizer": "tok"}, "output": "x.safetensors"}
    answer = client.post("/api/dry-run", json=body)
    assert answer.status_code == 400 and "leads outside" in answer.json()["error"]
    shutil.copy(library / "C.safetensors", outside / "shard.safetensors")
    (library / "te-00001-of-00001.safetensors").symlink_to(outside / "shard.safetensors")
    index = {"weight_map": {"w": "te-00001-of-00001.safetensors"}}
    (library / "te.safetensors.index.json").write_text(json.dumps(index))
    body = {"recipe": {**recipe(library, "A", "B"), "text_encoder": "te.safetensors.index.json"},
            "output": "x.safetensors"}  # fmt: skip
    answer = client.post("/api/dry-run", json=body)
    assert answer.status_code == 400 and "outside the models directories" in answer.json()["error"]
    # the CLI never writes over a text encoder's shard either
    (library / "te-00001-of-00001.safetensors").unlink()
    shutil.copy(library / "C.safetensors", library / "te-00001-of-00001.safetensors")
    before = (library / "te-00001-of-00001.safetensors").read_bytes()
    result = run("merge", library / "A.safetensors", library / "B.safetensors", "--text-encoder",
                 library / "te.safetensors.index.json", "-o",
                 library / "te-00001-of-00001.safetensors", "--overwrite")  # fmt: skip
    assert result.code == 2 and "the text encoder" in result.err
    assert (library / "te-00001-of-00001.safetensors").read_bytes() == before


def test_the_page_cannot_hold_some_uploads_and_says_so(client, library, held):
    huge = b"models: {A: A.safetensors}\nmerge: A\nseed: 9223372036854775783\n"
    answer = client.post("/api/recipe/parse", content=huge, headers=YAML)
    assert answer.status_code == 400 and "2^53" in answer.json()["error"]
    assert client.get("/api/jobs/%C2%B2").status_code in (400, 404)
    release, reached = held
    first = client.post("/api/merge", json={"recipe": recipe(library, "A", "B"),
                                            "output": "busy.safetensors"}).json()  # fmt: skip
    assert reached.wait(60)
    paths = [str(library / f"{n}.safetensors") for n in "AB"]
    answer = client.post("/api/similarity", json={"models": paths})
    assert answer.status_code == 400 and "a merge is running" in answer.json()["error"]
    release.set()
    assert wait(client, first)["status"] == "done"


def test_the_host_names_served(monkeypatch):
    from weightmix.ui.commands import _host_names

    assert "127.0.0.2" in _host_names("127.0.0.2") and "localhost" in _host_names("127.0.0.2")
    assert "[::1]" in _host_names("::1")
    everywhere = _host_names("0.0.0.0")
    assert socket.gethostname() in everywhere and "evil.example" not in everywhere


def test_one_ui_serves_a_models_directory_at_a_time(library, run):
    with serve(library) as client:
        assert client.get("/api/models").status_code == 200
        result = run("ui", "--models-dir", library, "--port", 0)
        assert result.code == 2 and "another weightmix ui" in result.err
    with serve(library) as client:  # the first has stopped: the folder is free again
        assert client.get("/api/models").status_code == 200
