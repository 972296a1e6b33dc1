"""One registry mechanism, typed per-method options, one stays-dense rule, one allocation per compress, family target
groups, and an import graph without cycles."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import lmshrink
from lmshrink.accounting import keep_if_smaller, largest_smaller_rank, stays_dense
from lmshrink.errors import InvalidArgument
from lmshrink.methods import METHODS, get_method
from lmshrink.plan import COMMON_TARGET_GROUPS, Plan, select_targets
from lmshrink.registry import Registry

from conftest import tiny_gpt2

PACKAGE = Path(lmshrink.__file__).parent


# ------------------------------------------------------------------------------------------------ Registry


def test_registry_get_names_and_unknown_name_lists_known_and_close(tmp_path, monkeypatch):
    plugin = tmp_path / "lmshrink_test_plugin.py"
    plugin.write_text("import lmshrink_test_host as host\nhost.COUNT += 1\nhost.THINGS.register('gamma', 3)\n")
    (tmp_path / "lmshrink_test_host.py").write_text(
        "from lmshrink.registry import Registry\nCOUNT = 0\n"
        "THINGS = Registry('thing', '--thing', modules=('lmshrink_test_plugin',))\n"
        "THINGS.register('alpha', 1)\n@THINGS.register('alphabet')\ndef alphabet():\n    return 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import lmshrink_test_host as host

    # Declared modules are imported on the first lookup, not when the registry's module is imported, and once.
    assert host.COUNT == 0 and "lmshrink_test_plugin" not in sys.modules
    assert host.THINGS.names() == ["alpha", "alphabet", "gamma"]
    assert host.THINGS.get("gamma") == 3 and host.THINGS.get("alphabet")() == 2
    host.THINGS.get("alpha"), host.THINGS.names()
    assert host.COUNT == 1
    with pytest.raises(InvalidArgument) as error:
        host.THINGS.get("alpah")
    assert str(error.value).startswith("--thing: unknown thing 'alpah'")
    assert "alpha, alphabet, gamma (close: alpha" in str(error.value)
    with pytest.raises(ValueError, match="registered twice"):
        host.THINGS.register("alpha", 99)
    view = host.THINGS.mapping()
    assert view.get("nothing") is None and view["gamma"] == 3 and list(view) == ["alpha", "alphabet", "gamma"]
    # A declared module that fails to import fails every lookup, never passing for an unknown name.
    broken = Registry("thing", "--thing", modules=("lmshrink_test_no_such_plugin",))
    for _ in range(2):
        with pytest.raises(ModuleNotFoundError):
            broken.get("alpha")


def test_every_registry_is_a_registry_with_its_entries():
    from lmshrink.allocation import ALLOCATIONS
    from lmshrink.analysis import ANALYSES
    from lmshrink.layers.base import LAYERS
    from lmshrink.models.family import MODEL_FAMILIES

    for registry in (METHODS, ALLOCATIONS, MODEL_FAMILIES, LAYERS, ANALYSES):
        assert isinstance(registry, Registry)
    assert {"svd", "fwhiten", "groupreduce", "quantize", "tt", "tt-matrix", "prune"} <= set(METHODS.names())
    assert ALLOCATIONS.names() == ["sensitivity", "uniform"]
    assert {"hf", "hf-encoder", "word-lstm", "lmshrink-directory"} <= set(MODEL_FAMILIES.names())
    assert {"LowRankLinear", "TiedHead", "PrunedLinear", "TTEmbedding", "BlockLowRankOutput"} <= set(LAYERS.names())
    assert "_BlockLowRankTable" not in LAYERS  # an abstract base is not a layer a manifest may name
    assert "norms" in ANALYSES
    with pytest.raises(InvalidArgument, match=r"--allocation: unknown allocation 'sensitive'.*close: sensitivity"):
        lmshrink.compress(tiny_gpt2(), Plan(ratio=0.5, allocation="sensitive"), progress=False)


def test_a_manifest_naming_the_directory_opener_as_its_family_is_refused(tmp_path):
    from lmshrink.errors import CorruptFile

    lmshrink.save(tiny_gpt2(), tmp_path / "saved")
    assert lmshrink.load_model(tmp_path / "saved").family.name == "hf"  # opened by "lmshrink-directory", built by "hf"
    manifest = tmp_path / "saved" / "lmshrink.json"
    manifest.write_text(manifest.read_text().replace('"family": "hf"', '"family": "lmshrink-directory"'))
    with pytest.raises(CorruptFile, match="names model family 'lmshrink-directory', which opens saved directories"):
        lmshrink.load(tmp_path / "saved")


# ------------------------------------------------------------------------------------------------ method options


def test_each_method_has_its_own_typed_options_and_defaults():
    groupreduce, quantize = get_method("groupreduce"), get_method("quantize")
    assert groupreduce.resolve_options({}).bits == 0 and quantize.resolve_options({}).bits == 8
    options = quantize.resolve_options({"bits": 4})
    assert dataclasses.is_dataclass(options) and options.bits == 4 and options.quant_group == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.bits = 2
    assert options.to_dict() == {"bits": 4, "quant_group": 0}
    with pytest.raises(InvalidArgument, match=r"--bits: 9 is outside \[0, 8\]"):
        quantize.resolve_options({"bits": 9})
    with pytest.raises(InvalidArgument, match=r"--split: 'thirds' is not supported"):
        groupreduce.resolve_options({"split": "thirds"})
    with pytest.raises(InvalidArgument, match=r"options: method 'svd' has no option\(s\) \['bits'\]; allowed: none"):
        get_method("svd").resolve_options({"bits": 8})
    tt = {o.name: o for o in get_method("tt-matrix").options}
    assert tt["tt_max_rank"].type is int and tt["tt_max_rank"].default is None and "tt_vocab_shape" in tt
    assert "tt_vocab_shape" not in {o.name for o in get_method("tt").options}


def test_methods_command_and_compress_help_show_each_methods_defaults():
    from lmshrink.cli import main

    listing = CliRunner().invoke(main, ["methods"]).output
    blocks = {}
    for line in listing.splitlines():
        if line and not line.startswith(" "):
            current = line.split()[0]
        elif line.strip().startswith("--"):
            blocks.setdefault(current, []).append(line.strip())
    assert any(line.startswith("--bits:") and "[default: 0]" in line for line in blocks["groupreduce"])
    assert any(line.startswith("--bits:") and "[default: 8]" in line for line in blocks["quantize"])
    help_text = " ".join(CliRunner().invoke(main, ["compress", "--help"], terminal_width=400).output.split())
    assert "groupreduce: bits per stored factor value" in help_text and "[default: 0; an integer >= 0 and <= 8]" in help_text
    assert "quantize: bits per stored value" in help_text and "[default: 8; an integer >= 0 and <= 8]" in help_text


def test_compress_refuses_another_methods_option_naming_its_own(tmp_path):
    from lmshrink.cli import main

    result = CliRunner().invoke(main, ["compress", "x", "--method", "rsvd", "--groups", "4", "--no-save"])
    assert result.exit_code == 2
    assert "--groups: not an option of method 'rsvd'; allowed: --power-iterations" in result.output
    # --bits is the plan's (quantized factors, any method), not groupreduce's alone: rsvd takes it.
    result = CliRunner().invoke(main, ["compress", "x", "--method", "rsvd", "--bits", "4", "--no-save"])
    assert "not an option" not in result.output


def test_plan_options_stay_a_json_dict_in_the_report():
    loaded = tiny_gpt2()
    report = lmshrink.compress(loaded, Plan(method="rsvd", ratio=0.5, options={"power_iterations": 1}), progress=False)
    assert json.loads(json.dumps(report.plan))["options"] == {"power_iterations": 1}


# ------------------------------------------------------------------------------------------------ stays dense


def test_one_rule_decides_stays_dense_for_ranks_and_modules():
    for m in range(1, 40):
        for n in range(1, 40):
            top = largest_smaller_rank((m, n))
            smaller = [k for k in range(1, min(m, n) + 1) if not stays_dense(k * (m + n), m * n)]
            assert top == (max(smaller) if smaller else None), (m, n)
            assert all(keep_if_smaller(k, (m, n)) == (k if k in smaller else None) for k in range(1, min(m, n) + 1))
            for step in (2, 8):
                rounded = largest_smaller_rank((m, n), step)
                multiples = [k for k in smaller if k % step == 0]
                assert rounded == (max(multiples) if multiples else None)


def test_module_methods_leave_a_table_dense_when_not_smaller():
    loaded = tiny_gpt2(tie=False)
    # Trains of TT rank 48 hold more than the 300 x 48 table: the embedding stays dense, and the report says so.
    report = lmshrink.compress(loaded, Plan(method="tt", targets="embedding", rank=48), progress=False)
    assert [row["status"] for row in report.modules] == ["dense (not smaller)"]
    assert isinstance(loaded.model.get_submodule("transformer.wte"), torch.nn.Embedding)


# ------------------------------------------------------------------------------------------------ allocation, spectra


def test_allocate_runs_once_per_compress(monkeypatch):
    import lmshrink.allocation as allocation

    calls = []
    real = allocation.svd
    monkeypatch.setattr(allocation, "svd", lambda weight: calls.append(tuple(weight.shape)) or real(weight))
    loaded = tiny_gpt2()
    report = lmshrink.compress(loaded, Plan(method="svd", energy=0.9), progress=False)
    targets = [row["name"] for row in report.modules]
    assert len(targets) == 8 and len(calls) == len(targets)  # one spectrum per matrix (energy rule), not three


def test_sensitivity_asks_the_method_for_its_spectrum(monkeypatch):
    method = get_method("rsvd")
    seen = []

    def spectrum(weight, stats, options):
        seen.append(options.power_iterations)
        return method.spectrum(weight, stats, options)

    monkeypatch.setitem(METHODS._entries, "rsvd", dataclasses.replace(method, spectrum=spectrum))
    plan = Plan(method="rsvd", ratio=0.5, allocation="sensitivity", options={"power_iterations": 1})
    lmshrink.compress(tiny_gpt2(), plan, progress=False)
    assert seen == [1] * 8
    values, in_loss = method.error_spectrum(torch.eye(3) * torch.tensor([3.0, 2.0, 1.0]), {})
    assert not in_loss and torch.allclose(values, torch.tensor([9.0, 4.0, 1.0], dtype=torch.float64) / 14)


# ------------------------------------------------------------------------------------------------ target groups


def test_target_groups_belong_to_the_family():
    from lmshrink.models.lstm import WORD_LSTM, RNNModel, Vocabulary

    assert "lstm" not in COMMON_TARGET_GROUPS and "W_i" not in COMMON_TARGET_GROUPS
    lstm = lmshrink.LoadedModel(RNNModel(20, 8, 8, 2, dropout=0.0), WORD_LSTM, Vocabulary([f"w{i}" for i in range(20)]), "tiny")
    assert [t.name for t in select_targets(lstm.candidates(), ("lstm",))] == ["rnn.ih_l0", "rnn.hh_l0", "rnn.ih_l1", "rnn.hh_l1"]
    assert [t.name for t in select_targets(lstm.candidates(), ("W_h",))] == ["rnn.hh_l0", "rnn.hh_l1"]
    with pytest.raises(InvalidArgument, match="pattern 'lstm' matches no module"):
        select_targets(tiny_gpt2().candidates(), ("lstm",))  # a GPT-2 has no LSTM groups, whatever was imported


# ------------------------------------------------------------------------------------------------ import graph


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """lmshrink module -> the lmshrink modules it imports anywhere (top level or inside functions).

    ``from package import name`` depends on package.name when that is a module, else on the package. A parent package
    that Python initialises before a submodule is not an edge: the parent is what the import statement names.
    """
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                for alias in node.names:
                    found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        edges = set()
        for target in found:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


ALLOWED_EDGES: set[tuple[str, str]] = set()  # none: every module imports what it needs from the module that owns it


def test_import_graph_has_no_cycle():
    graph = _import_graph()
    assert len(graph) > 60 and "lmshrink.models.lstm.zoo" in graph and "lmshrink.registry" in graph
    for source, target in ALLOWED_EDGES:
        graph[source].discard(target)
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_graph_sees_function_level_imports():
    graph = _import_graph()
    assert "lmshrink.io" in graph["lmshrink.models.saved"]
    assert "lmshrink.models" in graph["lmshrink.io"]  # io.save imports load_model inside the function


@pytest.mark.parametrize("seed", [0, 1])
def test_every_module_imports_alone_in_any_order(seed):
    names = sorted(name for name in _import_graph() if not name.endswith("__main__"))  # that one runs the CLI
    random.Random(seed).shuffle(names)
    script = ("import importlib, sys\n"
              f"for name in {names!r}:\n"
              "    importlib.import_module(name)\n"
              "print('ok', len(sys.modules) > 0)\n")
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}  # this checkout's lmshrink, whatever is installed
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stderr[-2000:]
