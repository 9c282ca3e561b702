"""The package's import graph follows the data flow of docs/design.md, one way.

Stages, in order; a module may import only modules earlier in this list. Imports inside
functions count as much as those at the top.

    errors -> safejson -> safeyaml -> records -> store -> datafiles -> runtime_env -> hub -> tracking -> specid -> spec -> specdoc -> plan
        -> jobs -> registry   no torch: the queries, the planner, the job client
    device (where and in which dtype a process computes)
    quant -> lora -> base -> weights -> model -> counting -> sources -> chat -> data -> datareport -> epochs
        -> validate -> plot -> adapter   the model, the data, the artifact
    checkpoint (resumable state: safetensors + JSON, verified)
    engine (the only DeepSpeed importer)
    earlystop -> progress (metrics.jsonl) -> train (the one loop) -> worker -> launch (the only ray.train importer) -> jobrun
    embedded (the local backend) -> client (the SDK)   no torch at import either: they reach launch
                                                       only in the job's own process
    generate -> metrics -> slots -> evaluate -> evaldata -> cli
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lora_dist"
ORDER = ["errors", "safejson", "safeyaml", "records", "signing", "confine", "store", "datafiles", "runtime_env", "hub", "tracking", "specid", "spec", "specdoc", "plan", "jobs",
         "registry", "device", "quant", "lora", "base", "weights", "model", "counting", "fits", "sources", "chat", "data", "datareport",
         "epochs", "validate", "plot", "adapter", "checkpoint", "engine", "earlystop", "progress", "mfu", "train", "worker", "launch",
         "jobrun", "embedded", "client", "generate", "metrics", "slots", "byattrs", "evaluate", "evaldata", "merge", "multilora",
         "decode", "served", "serving", "servestart", "usecmds", "cli"]


def _imports(path: Path) -> dict[str, set[str]]:
    """(package modules, third-party top-level names) imported anywhere in ``path``."""
    ours, theirs = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("lora_dist."):
                ours.add(name.split(".")[1])
            elif name != "lora_dist":
                theirs.add(name)
    return {"ours": ours & set(ORDER), "theirs": theirs}


def test_every_module_has_a_stage():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == set(ORDER), modules ^ set(ORDER)


def test_no_module_imports_a_later_stage():
    later = []
    for name in ORDER:
        for dep in _imports(PACKAGE / f"{name}.py")["ours"]:
            if ORDER.index(dep) >= ORDER.index(name):
                later.append(f"{name} imports {dep}")
    assert not later, later


def test_ray_train_and_deepspeed_each_have_one_importer():
    ray_train = {n for n in ORDER if any(t.startswith("ray.train") for t in _imports(PACKAGE / f"{n}.py")["theirs"])}
    deepspeed = {n for n in ORDER if any(t.split(".")[0] == "deepspeed" for t in _imports(PACKAGE / f"{n}.py")["theirs"])}
    assert ray_train == {"launch"} and deepspeed == {"engine"}, (ray_train, deepspeed)


def test_modules_import_with_ray_train_unimportable():
    """Every module imports with ray.train unimportable (launch reaches it only when a job runs);
    the stages before the model import with torch, ray, deepspeed and transformers unimportable."""
    code = ("import importlib, sys\n"
            "for m in ('ray.train', 'ray.train.torch'): sys.modules[m] = None\n"
            f"for m in {ORDER!r}: importlib.import_module('lora_dist.' + m)\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().endswith("ok"), out.stderr[-3000:]
    light = ("import sys\nfor m in ('torch', 'ray', 'deepspeed', 'transformers'): sys.modules[m] = None\n"
             "import lora_dist.errors, lora_dist.store, lora_dist.spec, lora_dist.plan, lora_dist.jobs\n"
             "import lora_dist.registry, lora_dist.embedded, lora_dist.client\nprint('ok')\n")
    out = subprocess.run([sys.executable, "-c", light], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-3000:]


def test_the_sdk_imports_without_torch_or_ray(tmp_path):
    """`from lora_dist import Client` (a lazy attribute of the package) and what the job queries
    need of it import neither torch nor ray."""
    code = ("import sys\nfor m in ('torch', 'ray', 'deepspeed', 'transformers'): sys.modules[m] = None\n"
            "import lora_dist\nassert 'lora_dist.client' not in sys.modules\n"
            "from lora_dist import Client, Job, JobStatus\nprint(Client().jobs(), Job.__name__, JobStatus.__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "LORA_DIST_CACHE": str(tmp_path)})
    assert out.stdout.strip() == "[] Job JobStatus", out.stderr[-3000:]
