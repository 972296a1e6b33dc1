"""Saved lmshrink directories in the Hugging Face ecosystem: plain transformers refuses them, transformers after
`import lmshrink` loads them with lmshrink.load's logits, generate/pipeline/save_pretrained work, export --dense
gives a plain checkpoint with the compressed model's logits."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lmshrink
from lmshrink.errors import InvalidArgument, NotAModel
from lmshrink.layers.base import FactorizedModule
from tests.conftest import byte_tokenizer, saved_weights, tiny_gpt2, tiny_llama

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, vocab_size=256,
                        max_position_embeddings=64)
    return lmshrink.load_model(BertModel(config).eval(), tokenizer=byte_tokenizer())


def _saved(tmp_path_factory, name, loaded, targets=("linears",)):
    lmshrink.compress(loaded, lmshrink.Plan(ratio=0.5, targets=targets), progress=False)
    return lmshrink.save(loaded, tmp_path_factory.mktemp(name) / "model")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return _saved(tmp_path_factory, "llama", tiny_llama())


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    # Conv1D linears and a tied embedding: the head becomes a TiedHead over a LowRankEmbedding.
    loaded = tiny_gpt2()
    loaded.tokenizer = byte_tokenizer()
    return _saved(tmp_path_factory, "gpt2", loaded, ("linears", "embedding"))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return _saved(tmp_path_factory, "bert", tiny_bert())


def _outputs(model, causal=True):
    with torch.no_grad():
        result = model(input_ids=IDS, attention_mask=torch.ones_like(IDS))
    return result.logits if causal else result.last_hidden_state


def _child(code: str) -> subprocess.CompletedProcess:
    """Python in a fresh process that never imports lmshrink (it asserts so itself)."""
    return subprocess.run([sys.executable, "-c", code + "\nimport sys; assert 'lmshrink' not in sys.modules"],
                          capture_output=True, text=True, timeout=600)


def test_config_json_is_lmshrinks_own_with_the_base_config_inside(llama_dir, gpt2_dir):
    config = json.loads((llama_dir / "config.json").read_text())
    assert config["model_type"] == "lmshrink" and config["architectures"] == ["LmshrinkForCausalLM"]
    base = config["lmshrink"]["base_config"]
    assert base["model_type"] == "llama" and base["hidden_size"] == 64 and config["lmshrink"]["causal"] is True
    assert "import lmshrink" in config["lmshrink"]["about"]
    # No top-level value carries the base model type: LlamaConfig.from_pretrained would silently pick it up.
    assert not any(isinstance(v, dict) and "model_type" in v for v in config.values())
    assert json.loads((gpt2_dir / "config.json").read_text())["lmshrink"]["base_config"]["tie_word_embeddings"] is True


def test_plain_transformers_refuses_a_saved_directory_naming_lmshrink(llama_dir, bert_dir):
    # The trap of issue 16: without lmshrink, transformers used to build the dense base model with random weights.
    result = _child(f"""
import transformers
for auto, directory in (("AutoModelForCausalLM", {str(llama_dir)!r}), ("AutoModel", {str(bert_dir)!r}), ("AutoConfig", {str(llama_dir)!r})):
    try:
        getattr(transformers, auto).from_pretrained(directory)
    except ValueError as error:
        print(auto, str(error).splitlines()[0])
    else:
        print(auto, "LOADED")
""")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["AutoModelForCausalLM", "AutoModel", "AutoConfig"]
    for line in lines:
        assert "has model type `lmshrink` but Transformers does not recognize this architecture" in line, line


def test_a_model_class_used_directly_refuses_a_saved_directory_naming_lmshrink(llama_dir, gpt2_dir, bert_dir):
    # LlamaForCausalLM.from_pretrained skips the model-type check: it used to build LLaMA's default 7B config with random
    # weights. It must fail while parsing config.json, quoting how to load the directory, and build nothing.
    result = _child(f"""
import transformers
for cls, directory in (("LlamaForCausalLM", {str(llama_dir)!r}), ("GPT2LMHeadModel", {str(gpt2_dir)!r}),
                       ("BertModel", {str(bert_dir)!r}), ("LlamaConfig", {str(llama_dir)!r})):
    try:
        getattr(transformers, cls).from_pretrained(directory)
    except Exception as error:
        print(cls, type(error).__name__, str(error).splitlines()[0])
    else:
        print(cls, "LOADED")
""")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["LlamaForCausalLM", "GPT2LMHeadModel", "BertModel", "LlamaConfig"]
    for line in lines:
        assert "LOADED" not in line and "lmshrink: a compressed model" in line and "import lmshrink" in line, line


@pytest.mark.parametrize("fixture,auto", [("llama_dir", "AutoModelForCausalLM"), ("gpt2_dir", "AutoModelForCausalLM"),
                                          ("bert_dir", "AutoModel")])
def test_auto_classes_after_import_give_lmshrink_loads_logits(request, fixture, auto):
    import transformers

    directory = request.getfixturevalue(fixture)
    reference = lmshrink.load(directory)
    model = getattr(transformers, auto).from_pretrained(directory)
    assert isinstance(model, type(reference.model)) and type(model).__name__ == type(reference.model).__name__
    assert any(isinstance(m, FactorizedModule) for m in model.modules())
    assert torch.equal(_outputs(model, reference.causal), _outputs(reference.model, reference.causal))
    config = transformers.AutoConfig.from_pretrained(directory)
    assert config.model_type == "lmshrink" and config.base().model_type == reference.model.config.model_type


def test_auto_class_of_the_wrong_kind_says_which_to_use(llama_dir, bert_dir):
    from transformers import AutoModel, AutoModelForCausalLM

    with pytest.raises(NotAModel, match="causal language model; load it with AutoModelForCausalLM"):
        AutoModel.from_pretrained(llama_dir)
    with pytest.raises(NotAModel, match="an encoder; load it with AutoModel"):
        AutoModelForCausalLM.from_pretrained(bert_dir)
    with pytest.raises(InvalidArgument, match=r"from_pretrained: options \['load_in_8bit'\] are not supported"):
        AutoModelForCausalLM.from_pretrained(llama_dir, load_in_8bit=True)
    with pytest.raises(InvalidArgument, match="device_map"):
        AutoModelForCausalLM.from_pretrained(llama_dir, device_map={"model": "cpu", "lm_head": "meta"})


def test_dtype_and_device_map(llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16, device_map="cpu")
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    reference = _outputs(lmshrink.load(llama_dir).model)
    assert torch.allclose(_outputs(model).float(), reference, atol=0.05 * float(reference.abs().max()))


def _greedy(model, ids, steps):
    ids = ids.clone()
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


def test_generate_and_pipeline_match_greedy_decoding(gpt2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    prompt = tokenizer("The cat sat", return_tensors="pt")["input_ids"]
    expected = _greedy(lmshrink.load(gpt2_dir).model, prompt, 6)
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, expected)
    text = pipeline("text-generation", model=model, tokenizer=tokenizer)("The cat sat", max_new_tokens=6, do_sample=False)
    assert text[0]["generated_text"] == tokenizer.decode(expected[0])


def test_save_pretrained_writes_an_lmshrink_directory_again(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    model.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "lmshrink.json").is_file()
    assert json.loads((tmp_path / "again" / "config.json").read_text())["model_type"] == "lmshrink"
    assert torch.equal(_outputs(AutoModelForCausalLM.from_pretrained(tmp_path / "again")), _outputs(model))
    model.save_pretrained(tmp_path / "again")  # into its own earlier save, as transformers allows
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(InvalidArgument, match="not an lmshrink directory"):
        model.save_pretrained(tmp_path / "foreign")
    assert sorted(p.name for p in (tmp_path / "foreign").iterdir()) == ["notes.txt"]


def _cli(*args, check=True):
    """The command line in-process (click's runner): exit status, stdout and stderr apart."""
    from click.testing import CliRunner

    from lmshrink.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    if check:
        assert result.exit_code == 0, (result.stderr, result.exception)
    return result


def test_cli_generate_with_reference(llama_dir, tmp_path):
    original = tiny_llama()  # the same seed: the model llama_dir was compressed from
    original.model.save_pretrained(tmp_path / "original")
    original.tokenizer.save_pretrained(tmp_path / "original")
    result = json.loads(_cli("generate", llama_dir, "--prompt", "Hello", "--max-new-tokens", 5,
                             "--reference", tmp_path / "original", "--json").stdout)
    tokenizer = original.tokenizer
    prompt = tokenizer("Hello", return_tensors="pt")["input_ids"]
    for model, key in ((lmshrink.load(llama_dir).model, "text"), (original.model, "reference_text")):
        assert result[key] == tokenizer.decode(_greedy(model, prompt, 5)[0, prompt.shape[1]:])
    assert result["text"] != result["reference_text"]  # ratio 0.5 changes a random model's choices


def test_cli_generate_on_an_encoder_is_one_line_exit_2(bert_dir):
    result = _cli("generate", bert_dir, "--prompt", "Hello", check=False)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: MODEL: {str(bert_dir)!r} is an encoder; allowed: a causal language model (generation needs next-token logits)"]


def test_export_dense_loads_in_plain_transformers_with_the_same_logits(llama_dir, gpt2_dir, bert_dir, tmp_path):
    from safetensors.torch import load_file

    cases = {"llama": (llama_dir, "AutoModelForCausalLM"), "gpt2": (gpt2_dir, "AutoModelForCausalLM"), "bert": (bert_dir, "AutoModel")}
    for name, (directory, _) in cases.items():
        assert "written:" in _cli("export", directory, "--dense", "--out", tmp_path / name).stdout
        compressed = lmshrink.load(directory)
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["model_type"] == compressed.model.config.model_type
        assert not (tmp_path / name / "lmshrink.json").exists() and (tmp_path / name / "tokenizer.json").is_file()
        # The size gain is lost: the dense checkpoint is larger than the factors.
        assert (tmp_path / name / "model.safetensors").stat().st_size > saved_weights(directory).stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert", "gpt2", "llama"]  # no staging folder left behind
    # Plain transformers, in a process that never imports lmshrink, runs each export.
    result = _child(f"""
import torch
from safetensors.torch import save_file
import transformers
ids = torch.tensor({IDS.tolist()})
for name, auto in {[(name, auto) for name, (_, auto) in cases.items()]!r}:
    model = getattr(transformers, auto).from_pretrained({str(tmp_path)!r} + "/" + name).eval()
    with torch.no_grad():
        result = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    out = result.logits if auto == "AutoModelForCausalLM" else result.last_hidden_state
    save_file({{"out": out.contiguous()}}, {str(tmp_path)!r} + "/" + name + ".safetensors")
""")
    assert result.returncode == 0, result.stderr
    for name, (directory, _) in cases.items():
        compressed = lmshrink.load(directory)
        want = _outputs(compressed.model, compressed.causal)
        dense = load_file(tmp_path / f"{name}.safetensors")["out"]
        assert torch.allclose(dense, want, rtol=0, atol=1e-5 * float(want.abs().max())), name


class _NoDenseForm(FactorizedModule):
    """A factorized layer with no dense_weight(): what export --dense must refuse."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.inner = linear

    def forward(self, x):
        return self.inner(x)

    def layer_config(self):
        return {}


def test_export_refuses_layers_without_a_dense_form_and_writes_nothing(llama_dir, tmp_path):
    from lmshrink.export import densifiable_layers, export_dense
    from lmshrink.layers.base import replace_module

    loaded = lmshrink.load(llama_dir)
    replace_module(loaded.model, "model.layers.0.mlp.up_proj", _NoDenseForm(nn.Linear(64, 128, bias=False)))
    with pytest.raises(InvalidArgument, match=r"MODEL_DIR: cannot densify model.layers.0.mlp.up_proj \(_NoDenseForm\).*"
                                              r"allowed: models whose factorized layers are of these types: .*LowRankLinear"):
        export_dense(loaded, tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    assert {"LowRankLinear", "LowRankEmbedding", "TiedHead"} <= set(densifiable_layers())
    assert "_NoDenseForm" not in densifiable_layers()


def test_export_refuses_a_non_empty_out_and_a_missing_dense_flag(llama_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    result = _cli("export", llama_dir, "--dense", "--out", tmp_path / "taken", check=False)
    assert result.exit_code == 2 and "error: --out:" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
    result = _cli("export", llama_dir, "--out", tmp_path / "new", check=False)
    assert result.exit_code == 2 and "error: --dense: not given" in result.stderr and not (tmp_path / "new").exists()
    assert sorted(os.listdir(tmp_path)) == ["taken"]
