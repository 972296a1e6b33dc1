"""Joint factorization (--joint, issue 15 lever 4): linears of one input share one right factor."""

from __future__ import annotations

import json

import pytest
import torch

import lmshrink
from conftest import tiny_llama
from lmshrink.accounting import count_params
from lmshrink.errors import CorruptFile, InvalidArgument
from lmshrink.joint import JointTarget, joint_targets, merged_stats, model_groups
from lmshrink.plan import select_targets
from lmshrink.sequential import compress_sequential
from test_sequential import WINDOW, WINDOWS, _cli, _plan, checkpoint, corpus  # noqa: F401 (fixtures)


def _attention(model, block=0):
    return model.model.layers[block].self_attn


def test_linears_are_grouped_by_the_tensor_they_read():
    loaded = tiny_llama()
    linears = select_targets(loaded.candidates(), ("linears",))
    targets = joint_targets(linears, model_groups(loaded, linears))
    joint = [t for t in targets if isinstance(t, JointTarget)]
    leaves = [[m.name.rsplit(".", 1)[1] for m in t.members] for t in joint]
    assert leaves == [["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]] * 2
    assert [t.name.rsplit(".", 1)[1] for t in targets if not isinstance(t, JointTarget)] == ["o_proj", "down_proj"] * 2
    first = joint[0]
    assert first.shape == (sum(m.shape[0] for m in first.members), 64)
    assert torch.equal(first.weight(), torch.cat([m.weight() for m in first.members]))


def test_statistics_merge_by_their_side():
    loaded = tiny_llama()
    joint = next(t for t in joint_targets(loaded.candidates(), model_groups(loaded, loaded.candidates())) if isinstance(t, JointTarget))
    stats = {m.name: {"fisher": torch.full(m.shape, float(i)), "input_gram": torch.eye(64) * (i + 1),
                      "output_grad_gram": torch.full((m.shape[0], m.shape[0]), float(i))} for i, m in enumerate(joint.members)}
    merged = merged_stats(joint, stats)
    outs = [m.shape[0] for m in joint.members]
    assert merged["fisher"].shape == joint.shape and merged["fisher"][outs[0]:outs[0] + outs[1]].eq(1).all()
    assert torch.equal(merged["input_gram"], stats[joint.members[0].name]["input_gram"])  # one input: the first's
    gram = merged["output_grad_gram"]
    assert gram.shape == (sum(outs), sum(outs)) and gram[:outs[0], outs[0]:].eq(0).all() and gram[outs[0]:outs[0] + outs[1], outs[0]:outs[0] + outs[1]].eq(1).all()


@pytest.mark.parametrize("method", ["svd", "svdllm", "fwhiten", "kfac"])
def test_joint_members_share_one_right_factor_and_rebuild_their_matrices(method, corpus, tmp_path):
    loaded = tiny_llama(seed=2)
    original = {n: m.weight.detach().clone() for n, m in loaded.model.named_modules() if isinstance(m, torch.nn.Linear)}
    before = count_params(loaded.model)
    report = lmshrink.compress(loaded, _plan(method, joint=True), data=corpus, progress=False)
    rows = report.modules
    assert len(rows) == 14 and all(r["status"] == "factorized" for r in rows)
    assert sum("joint" in r for r in rows) == 10
    attention = _attention(loaded.model)
    assert attention.q_proj.right is attention.k_proj.right is attention.v_proj.right
    assert attention.o_proj.right is not attention.q_proj.right
    # The report's rows add up to the model's count (the shared factor counted once), at the plan's ratio.
    assert report.params_after == count_params(loaded.model) == before - sum(r["params_before"] - r["params_after"] for r in rows)
    dense = sum(r["params_before"] for r in rows)
    assert sum(r["params_after"] for r in rows) == pytest.approx(0.5 * dense, rel=0.03)
    for row in rows:  # each member rebuilds its own matrix from its rows of the left factor and the shared right
        layer = loaded.model.get_submodule(row["name"])
        error = float((original[row["name"]] - layer.dense_weight().detach()).norm() / original[row["name"]].norm())
        assert error == pytest.approx(row["relative_error"], rel=1e-4) and (method != "svd" or error < 1)
    lmshrink.save(loaded, tmp_path / "saved")
    again = lmshrink.load(tmp_path / "saved")
    reloaded = _attention(again.model)
    assert reloaded.q_proj.right is reloaded.k_proj.right is reloaded.v_proj.right
    ids = torch.arange(24)[None]
    assert torch.equal(loaded.logits(ids), again.logits(ids)) and count_params(again.model) == report.params_after
    stored = json.loads((tmp_path / "saved" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.self_attn.q_proj.right" in stored and "model.layers.0.self_attn.k_proj.right" not in stored


def test_joint_beats_separate_factors_at_the_same_budget_on_the_whitened_error(corpus):
    """The reason for --joint: one basis for q/k/v (gate/up) buys more than three at the same parameter count."""
    from lmshrink.calibration import collect_stats

    errors = {}
    for joint in (False, True):
        loaded = tiny_llama(seed=2)
        targets = lmshrink.surgery.check_plan(loaded, _plan("svdllm"))
        stats = collect_stats(loaded, targets, corpus, {"input_gram"}, windows=WINDOWS, window_len=WINDOW, progress=False, cache=False)
        weights = {t.name: t.weight().detach().clone() for t in targets}
        report = lmshrink.compress(loaded, _plan("svdllm", joint=joint), data=corpus, progress=False)
        with torch.no_grad():
            errors[joint] = sum(float(torch.einsum("ij,jk,ik->", d, stats[name]["input_gram"].float(), d))
                                for name in weights for d in [weights[name] - loaded.model.get_submodule(name).dense_weight()])
        errors[joint, "params"] = report.params_after
    assert errors[True, "params"] <= errors[False, "params"] * 1.01
    assert errors[True] < 0.9 * errors[False], errors


def test_block_by_block_joint_equals_the_whole_model_joint(checkpoint, corpus, tmp_path):
    plan = _plan("svdllm", joint=True)
    report = compress_sequential(checkpoint, plan, corpus, tmp_path / "seq", dtype="float32", device="cpu", calibrate_on="original",
                                 progress=False)
    whole = lmshrink.load_model(checkpoint)
    whole_report = lmshrink.compress(whole, plan, data=corpus, progress=False)
    saved = lmshrink.load(tmp_path / "seq")
    assert [r["rank"] for r in report.modules] == [r["rank"] for r in whole_report.modules]
    assert [r.get("joint") for r in report.modules] == [r.get("joint") for r in whole_report.modules]
    ours, theirs = saved.model.state_dict(), whole.model.state_dict()
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-4, rtol=1e-3) for k in theirs)
    assert _attention(saved.model).q_proj.right is _attention(saved.model).v_proj.right
    assert report.params_after == whole_report.params_after


def test_joint_with_sensitivity_and_refit_block_by_block_meets_the_budget(checkpoint, corpus, tmp_path):
    plan = _plan("fwhiten", joint=True, allocation="sensitivity")
    report = compress_sequential(checkpoint, plan, corpus, tmp_path / "seq", dtype="float32", device="cpu", progress=False, refit=True)
    rows = report.modules
    dense = sum(r["params_before"] for r in rows)
    assert sum(r["params_after"] for r in rows) <= 0.5 * dense
    assert sum(r["params_after"] for r in rows) >= 0.5 * dense - max(r["shape"][0] + r["shape"][1] for r in rows) * 3
    shared = [r for r in rows if "joint" in r]
    assert shared  # the refit moves left factors only: the shared right factor stays shared (checked after loading)
    assert all(r["output_error"] <= r["output_error_before_refit"] for r in rows)
    saved = lmshrink.load(tmp_path / "seq")
    attention = _attention(saved.model, 1)
    assert attention.q_proj.right is attention.k_proj.right and count_params(saved.model) == report.params_after


def test_joint_refusals():
    with pytest.raises(InvalidArgument, match="^--joint: .*--bits"):
        lmshrink.Plan(method="svd", ratio=0.5, joint=True, bits=8)
    with pytest.raises(InvalidArgument, match="^--joint: method 'prune'"):
        lmshrink.compress(tiny_llama(), lmshrink.Plan(method="prune", ratio=0.5, joint=True), progress=False)


@pytest.mark.parametrize("module,shared,needle", [
    ("o_proj", {"right": "model.layers.0.self_attn.k_proj"}, "shares nothing itself"),  # k_proj shares q_proj's: no chains
    ("k_proj", {"right": "nowhere"}, "another factorized module"),
    ("o_proj", {"right": "model.layers.0.self_attn.q_proj"}, "of one shape"),  # o_proj's rank differs
    ("k_proj", "right", "a mapping")])
def test_hostile_shared_entries_are_refused_in_one_line(tmp_path, module, shared, needle):
    loaded = tiny_llama(seed=1)
    lmshrink.compress(loaded, lmshrink.Plan(method="svd", ratio=0.5, joint=True), progress=False)
    lmshrink.save(loaded, tmp_path / "saved")
    path = tmp_path / "saved" / "lmshrink.json"
    manifest = json.loads(path.read_text())
    manifest["modules"][f"model.layers.0.self_attn.{module}"]["shared"] = shared
    path.write_text(json.dumps(manifest))
    with pytest.raises(CorruptFile, match=needle) as caught:
        lmshrink.load(tmp_path / "saved")
    assert "\n" not in str(caught.value)


def test_cli_joint(checkpoint, corpus, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(corpus.train[:60_000])
    done = _cli("compress", checkpoint, "--method", "svdllm", "--ratio", "0.5", "--joint", "--data", text, "--calibration-windows", 2,
                "--window", 32, "--tokens", 128, "--out", tmp_path / "out", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["plan"]["joint"] is True and sum("joint" in m for m in result["modules"]) == 10
    assert result["params"]["after"] == count_params(lmshrink.load(tmp_path / "out").model)
