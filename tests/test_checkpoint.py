"""Save / load of dynamoq-quantized models (dynamoq/checkpoint.py).

save_pretrained -> from_pretrained is bit-exact on every family dynamoq quantizes; sharded
checkpoints, device_map and dtype= work; dynamoq.save/load serve other nn.Modules; without dynamoq,
transformers stops with a message naming the package; damaged or inconsistent checkpoints always
raise dynamoq.CheckpointError; a save killed midway leaves the previous checkpoint loadable.
"""
import copy
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import build, tokens
from test_families import REFUSED
from families import CORE, TINY
from safetensors.torch import load_file, save_file
from torch import nn

import dynamoq
from dynamoq import CheckpointError, DynaMoConfig, DynaMoExperts, SwitchableLinear
from dynamoq import checkpoint as ck
from dynamoq.tensors import _PackedWeight

TESTS = Path(__file__).parent
MIXED = [2, 3, 4, 8, 6]


@pytest.fixture(autouse=True)
def _quiet_transformers():
    import transformers

    level, bars = transformers.logging.get_verbosity(), transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    yield
    transformers.logging.set_verbosity(level)
    if bars:
        transformers.utils.logging.enable_progress_bar()


def quantized(model_type: str, shift: int = 0, **cfg):
    """A tiny model of one family with mixed per-expert bits (2, 3, 4, 8, 6, ... per layer)."""
    m = build(model_type)
    blocks = dynamoq.moe_blocks(m)
    bits = {b.layer: [MIXED[(i + b.layer + shift) % len(MIXED)] for i in range(b.num_experts)] for b in blocks}
    dynamoq.quantize_(m, DynaMoConfig(expert_bits=bits, group_size=32, **cfg))
    return m


def flat(model) -> dict:
    """Every tensor of a model, packed weights split into their parts and attributes."""
    out = {}
    for name, t in model.state_dict().items():
        if isinstance(t, _PackedWeight):
            parts, attrs = t.__tensor_flatten__()
            out[name] = (type(t).__name__, attrs, {p: getattr(t, p) for p in parts})
        else:
            out[name] = t
    return out


def assert_same(a, b):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys(), set(fa) ^ set(fb)
    for k, x in fa.items():
        y = fb[k]
        if isinstance(x, tuple):
            assert x[:2] == y[:2], (k, x[:2], y[:2])
            assert x[2].keys() == y[2].keys(), k
            for p in x[2]:
                assert x[2][p].dtype == y[2][p].dtype and torch.equal(x[2][p], y[2][p]), (k, p)
        else:
            assert x.dtype == y.dtype and torch.equal(x, y), k


def from_pretrained(path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **kw)


def experts_impl(model):
    return [b.experts.config._experts_implementation for b in dynamoq.moe_blocks(model)
            if b.adapter.fused and hasattr(b.experts, "config")]


# ---- round trips ----------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", [t for t in TINY if t not in REFUSED])   # refused: test_families
def test_save_pretrained_from_pretrained_is_bit_exact_on_every_family(model_type, tmp_path):
    m = quantized(model_type)
    m.save_pretrained(tmp_path)
    m2 = from_pretrained(tmp_path)
    assert_same(m, m2)
    assert experts_impl(m2) == experts_impl(m)
    assert dynamoq.bits_report(m2)["experts"] == dynamoq.bits_report(m)["experts"]


@pytest.mark.parametrize("model_type", CORE)
def test_core_families_give_the_same_logits_sharded_and_with_device_map(model_type, tmp_path):
    m = quantized(model_type)
    x = tokens(m)
    with torch.no_grad():
        ref = m(x).logits
    m.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    m2 = from_pretrained(tmp_path, device_map="cpu")
    assert_same(m, m2)
    assert set(experts_impl(m2)) <= {"dynamoq"}
    with torch.no_grad():
        assert torch.equal(m2(x).logits, ref)


def test_dtype_argument_matches_casting_the_quantized_model(tmp_path):
    m = quantized("qwen2_moe")
    m.save_pretrained(tmp_path)
    m2 = from_pretrained(tmp_path, dtype=torch.bfloat16, device_map={"": "cpu"})
    cast = copy.deepcopy(m).to(torch.bfloat16)
    assert_same(cast, m2)                      # packed parts, scales, zeros untouched; logical dtype bf16
    w = m2.model.layers[0].mlp.experts.gate_up_proj
    assert isinstance(w, DynaMoExperts) and w.dtype == torch.bfloat16 and w.scale.dtype == torch.float16
    x = tokens(m)
    with torch.no_grad():   # not equal: from_pretrained keeps RoPE's inv_freq in float32, .to() does not
        torch.testing.assert_close(m2(x).logits, cast(x).logits, atol=1e-2, rtol=0)


def test_quantization_config_describes_everything_needed_to_rebuild(tmp_path):
    m = quantized("deepseek_v3", shared_bits=6, dense_bits=4, attention_bits=8)
    m.save_pretrained(tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "dynamoq" and qc["format_version"] == ck.FORMAT_VERSION
    assert qc["group_size"] == 32 and qc["experts_implementation"] == "dynamoq"
    assert qc["expert_bits"] == {str(k): v for k, v in dynamoq.bits_report(m)["experts"].items()}
    assert qc["config"]["shared_bits"] == 6 and qc["config"]["dense_bits"] == 4 and qc["config"]["attention_bits"] == 8
    assert qc["modules"]["model.layers.0.self_attn.o_proj.weight"]["type"] == "SwitchableLinear"
    assert "switching_cache" in qc
    w = qc["modules"]["model.layers.1.mlp.experts.gate_up_proj"]
    assert w["type"] == "DynaMoExperts" and w["attributes"]["expert_bits"] == qc["expert_bits"]["1"]
    assert set(w["parts"]) == {"scale", "zero"} | {f"q{b}" for b in qc["expert_bits"]["1"]}
    # the stored DynaMoConfig re-quantizes the float model into exactly the saved checkpoint
    loaded = from_pretrained(tmp_path)
    again = build("deepseek_v3")
    dynamoq.quantize_(again, loaded.config.quantization_config.to_dynamo_config())
    assert_same(again, loaded)


def test_a_packed_head_is_untied_from_the_embeddings_and_stays_so_through_save_and_load(tmp_path):
    """lm_head_bits on a model whose head is its input embeddings: the head is packed, the embeddings keep
    their weights, tie_word_embeddings becomes False (tie_weights() and from_pretrained do not re-tie it)."""
    from transformers import AutoModelForCausalLM

    from families import tiny_config
    cfg = tiny_config("mixtral")
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    emb = m.model.embed_tokens.weight
    assert m.lm_head.weight is emb
    x = tokens(m)
    with torch.no_grad():
        ref = m(x).logits
    dynamoq.quantize_(m, DynaMoConfig(bits=4, lm_head_bits=8, group_size=32))
    assert isinstance(m.lm_head.weight, SwitchableLinear) and m.lm_head.weight.bits == 8
    assert m.model.embed_tokens.weight is emb and not m.config.tie_word_embeddings
    m.tie_weights()
    assert isinstance(m.lm_head.weight, SwitchableLinear)
    with torch.no_grad():
        out = m(x).logits
    assert ((out - ref).norm() / ref.norm()).item() < 0.1
    assert dynamoq.bits_report(m)["other"]["lm_head.weight"]["bits"] == 8
    m.save_pretrained(tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())
    assert qc["tie_word_embeddings"] is False and qc["quantization_config"]["config"]["lm_head_bits"] == 8
    loaded = from_pretrained(tmp_path)
    assert isinstance(loaded.lm_head.weight, SwitchableLinear) and not isinstance(loaded.model.embed_tokens.weight,
                                                                                 SwitchableLinear)
    assert torch.equal(loaded.model.embed_tokens.weight, emb)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, out)
    assert loaded.config.quantization_config.to_dynamo_config().lm_head_bits == 8
    # through torchao's quantize_ (the handler sees the head alone): saving unties it
    import torchao
    m = AutoModelForCausalLM.from_config(cfg).eval()
    torchao.quantization.quantize_(m, DynaMoConfig(bits=4, lm_head_bits=8, group_size=32), filter_fn=dynamoq.moe_filter)
    m.save_pretrained(tmp_path / "torchao")
    assert isinstance(from_pretrained(tmp_path / "torchao").lm_head.weight, SwitchableLinear)


def test_loaded_model_saves_again_and_other_files_survive(tmp_path):
    d = tmp_path / "ckpt"
    m = quantized("mixtral")
    m.save_pretrained(d, max_shard_size="40KB")
    (d / "tokenizer.json").write_text("{}")
    (d / "extra").mkdir()
    (d / "extra" / "notes.txt").write_text("kept")
    m2 = from_pretrained(d)
    m2.save_pretrained(d)                              # one file now: the old shards must go
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "dynamoq.json", "extra", "generation_config.json",
                                                   "model.safetensors", "tokenizer.json"]
    assert (d / "extra" / "notes.txt").read_text() == "kept"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]     # no temporary directory left
    assert_same(m, from_pretrained(d))
    assert "model.layers.0.block_sparse_moe.experts._gate_up_proj_scale" in load_file(d / "model.safetensors")


class TinyMoE(nn.Module):
    """Not a transformers model: fused experts, a linear, tied embedding and head, a buffer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 64)
        self.experts = nn.Parameter(torch.randn(4, 64, 64))
        self.proj = nn.Linear(64, 64)
        self.head = nn.Linear(64, 32, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, ids):
        x = self.embed(ids)
        x = torch.stack([x @ self.experts[e].T for e in range(4)]).mean(0) * self.scale
        return self.head(torch.relu(self.proj(x)))

    def quantize(self):
        self.experts = nn.Parameter(DynaMoExperts.from_float(self.experts.data, (2, 3, 4, 8), 32), requires_grad=False)
        self.proj.weight = nn.Parameter(SwitchableLinear.from_float(self.proj.weight.data, 4, 32), requires_grad=False)
        return self


def test_dynamoq_save_load_for_a_model_that_is_not_from_transformers(tmp_path):
    m = TinyMoE().quantize()
    dynamoq.save(m, tmp_path, max_shard_size="10KB")
    assert not (tmp_path / "config.json").exists() and (tmp_path / "model.safetensors.index.json").exists()
    ids = torch.randint(0, 32, (2, 5))
    for target in (TinyMoE(), TinyMoE().quantize()):       # a float or an already-quantized instance
        out = dynamoq.load(tmp_path, target)
        assert out is target
        assert_same(m, target)
        assert torch.equal(target(ids), m(ids))
    with torch.device("meta"):
        skeleton = TinyMoE()
    dynamoq.load(tmp_path, skeleton)
    assert torch.equal(skeleton(ids), m(ids))
    half = dynamoq.load(tmp_path, TinyMoE(), dtype=torch.bfloat16)
    assert half.experts.dtype == torch.bfloat16 and half.embed.weight.dtype == torch.bfloat16
    with pytest.raises(CheckpointError, match="pass the model"):
        dynamoq.load(tmp_path)


def test_dynamoq_load_of_a_transformers_checkpoint(tmp_path):
    m = quantized("olmoe")
    dynamoq.save(m, tmp_path)
    assert_same(m, dynamoq.load(tmp_path))
    assert_same(m, dynamoq.load(tmp_path, type(m), verify=False))


def _mixed_round_trip(path, tmp_path, group_size):
    m = from_pretrained(path, dtype=torch.float32)
    blocks = dynamoq.moe_blocks(m)
    bits = {b.layer: [MIXED[(i + b.layer) % len(MIXED)] for i in range(b.num_experts)] for b in blocks}
    dynamoq.quantize_(m, DynaMoConfig(expert_bits=bits, group_size=group_size))
    m.save_pretrained(tmp_path / "q")
    assert_same(m, from_pretrained(tmp_path / "q"))


def test_tiny_reference_model_round_trip(tmp_path):
    _mixed_round_trip(dynamoq.models.reference("tiny"), tmp_path, 128)


def test_real_reference_model_round_trip_on_a_cut_down_build(tmp_path):
    """The real model's builder on 2 layers and 2 domains (the full build runs in the benchmarks);
    its expert input dimensions are 576 and 1536, so group 64."""
    from dynamoq.reference import real
    dense = real.load_dense(real.fetch_gguf(progress=False), layers=2)
    path = real.build(tmp_path / "real", real.cut_down(), progress=False, corpus_root=Path(__file__).parent / "data",
                      dense=dense)
    _mixed_round_trip(path, tmp_path, 64)


# ---- without dynamoq --------------------------------------------------------------------------------
def test_loading_without_dynamoq_names_the_package(tmp_path):
    quantized("qwen3_moe").save_pretrained(tmp_path)
    script = textwrap.dedent(f"""
        import sys
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
        except Exception as e:
            assert "dynamoq" not in sys.modules
            print(type(e).__name__, e)
            sys.exit(3)
        sys.exit(0)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": ""}, cwd=tmp_path)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "pip install dynamoq" in r.stdout and "KeyError" not in r.stdout


# ---- safety -------------------------------------------------------------------------------------------
def test_nothing_is_unpickled(tmp_path, monkeypatch):
    m = quantized("qwen2_moe")
    m.save_pretrained(tmp_path / "hf")
    dynamoq.save(TinyMoE().quantize(), tmp_path / "plain")

    def refuse(*a, **k):
        raise AssertionError("unpickling during a dynamoq load")

    for mod, name in [(pickle, "load"), (pickle, "loads"), (torch, "load")]:
        monkeypatch.setattr(mod, name, refuse)
    assert_same(m, from_pretrained(tmp_path / "hf"))
    dynamoq.load(tmp_path / "plain", TinyMoE())


def rewrite_weights(path: Path, change, reseal=True):
    """Apply `change(tensors)` to the one safetensors file of a checkpoint (re-sealing the manifest)."""
    f = path / "model.safetensors"
    tensors = load_file(f)
    change(tensors)
    save_file(tensors, f, metadata={"format": "pt"})
    if reseal:
        ck.reseal(path)


def edit_config(path: Path, change, reseal=True):
    p = path / "config.json"
    cfg = json.loads(p.read_text())
    change(cfg)
    p.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if reseal:
        ck.reseal(path)


@pytest.fixture(scope="module")
def saved_qwen3(tmp_path_factory):
    m = quantized("qwen3_moe")
    path = tmp_path_factory.mktemp("qwen3")
    m.save_pretrained(path)
    return path


@pytest.fixture
def ckpt(saved_qwen3, tmp_path):
    shutil.copytree(saved_qwen3, tmp_path / "c")
    return tmp_path / "c"


Q4 = "model.layers.0.mlp.experts._gate_up_proj_q4"      # qwen3_moe layer 0 bits: [2, 3, 4, 8]


@pytest.mark.parametrize("case, change, message", [
    ("missing part", lambda t: t.pop(Q4), f"missing tensor {Q4}"),
    ("extra code plane", lambda t: t.update({Q4.replace("q4", "q6"): torch.zeros(1, 64, 48, dtype=torch.uint8)}),
     "unexpected tensor model.layers.0.mlp.experts._gate_up_proj_q6"),
    ("extra unknown part", lambda t: t.update({Q4.replace("q4", "junk"): torch.zeros(1)}),
     "unexpected tensor model.layers.0.mlp.experts._gate_up_proj_junk"),
    ("wrong shape", lambda t: t.update({Q4: t[Q4][:, :-1].contiguous()}), f"{Q4}: found"),
    ("wrong dtype", lambda t: t.update({Q4.replace("q4", "scale"): t[Q4.replace("q4", "scale")].float()}),
     "_gate_up_proj_scale: found"),
])
def test_inconsistent_weights_name_the_tensor(ckpt, case, change, message):
    rewrite_weights(ckpt, change)
    with pytest.raises(CheckpointError, match=message.replace(".", r"\.")):
        from_pretrained(ckpt)


def test_changed_weights_without_reseal_name_the_tensor_or_file(ckpt):
    rewrite_weights(ckpt, lambda t: t.pop(Q4), reseal=False)
    with pytest.raises(CheckpointError, match=f"missing tensor {Q4}"):
        from_pretrained(ckpt)
    with pytest.raises(CheckpointError, match=f"missing tensor {Q4}"):
        dynamoq.load(ckpt)


def test_bit_widths_that_do_not_match_the_packed_sizes(ckpt):
    def change(cfg):
        w = cfg["quantization_config"]["modules"]["model.layers.0.mlp.experts.gate_up_proj"]
        w["attributes"]["expert_bits"] = [4, 3, 4, 8]          # the 2-bit expert claims 4 bits
        w["parts"]["q4"]["shape"][0] = 2
        del w["parts"]["q2"]
    edit_config(ckpt, change)
    with pytest.raises(CheckpointError, match=r"_gate_up_proj_q2.*no 2-bit experts|_gate_up_proj_q4: found"):
        from_pretrained(ckpt)


def test_config_that_disagrees_with_the_weights(ckpt):
    edit_config(ckpt, lambda cfg: cfg.update(moe_intermediate_size=64))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.experts\.\w+: the checkpoint holds shape"):
        from_pretrained(ckpt)


def test_unknown_format_version(ckpt):
    edit_config(ckpt, lambda cfg: cfg["quantization_config"].update(format_version=99), reseal=False)
    with pytest.raises(CheckpointError, match="unknown dynamoq format version 99"):
        from_pretrained(ckpt)
    m = json.loads((ckpt / "dynamoq.json").read_text())
    m["format_version"] = 3
    (ckpt / "dynamoq.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="unknown dynamoq format version 3"):
        dynamoq.load(ckpt)
    m["format_version"] = 1
    (ckpt / "dynamoq.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="older dynamoq .format 1.*quantize the original model again"):
        dynamoq.load(ckpt)


def test_edited_config_needs_a_reseal(ckpt):
    edit_config(ckpt, lambda cfg: cfg.update(rms_norm_eps=1e-3), reseal=False)
    with pytest.raises(CheckpointError, match="config.json is damaged.*reseal"):
        from_pretrained(ckpt)
    ck.reseal(ckpt)
    assert from_pretrained(ckpt).config.rms_norm_eps == 1e-3


def _mutate(path: Path, rng: random.Random, files: list[str]) -> str:
    name = rng.choice(files)
    f = path / name
    data = bytearray(f.read_bytes())
    kind = rng.choice(["flip", "flip", "truncate", "both"])
    if kind in ("flip", "both"):
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] ^= rng.randint(1, 255)
    if kind in ("truncate", "both"):
        data = data[:rng.randrange(len(data))]
    f.write_bytes(bytes(data))
    return f"{kind} {name}"


def test_fuzz_damaged_checkpoints_always_raise_checkpoint_error(tmp_path):
    src = tmp_path / "src"
    quantized("mixtral").save_pretrained(src, max_shard_size="100KB")
    files = sorted(p.name for p in src.iterdir())
    assert len(files) >= 6
    rng = random.Random(0)
    for i in range(200):
        d = tmp_path / f"m{i}"
        shutil.copytree(src, d)
        what = _mutate(d, rng, files)
        with pytest.raises(CheckpointError):
            dynamoq.load(d)
            pytest.fail(f"mutation {i} ({what}) loaded")
        shutil.rmtree(d)


def test_fuzz_from_pretrained_on_weights_and_manifest(tmp_path):
    src = tmp_path / "src"
    quantized("qwen3_moe").save_pretrained(src)
    rng = random.Random(1)
    for i in range(30):
        d = tmp_path / f"m{i}"
        shutil.copytree(src, d)
        what = _mutate(d, rng, ["model.safetensors", "dynamoq.json"])
        with pytest.raises(CheckpointError):
            from_pretrained(d)
            pytest.fail(f"mutation {i} ({what}) loaded")
        shutil.rmtree(d)


def test_fuzz_headers_without_checksums_load_or_raise_checkpoint_error(tmp_path):
    """With verification off (DYNAMOQ_VERIFY=0), damage is still caught by the structure checks, or
    it was harmless (header padding) or hit tensor data; no other exception ever escapes."""
    src = tmp_path / "src"
    m = TinyMoE().quantize()
    dynamoq.save(m, src)
    header = 8 + int.from_bytes((src / "model.safetensors").read_bytes()[:8], "little")
    rng = random.Random(2)
    raised = 0
    for i in range(60):
        d = tmp_path / f"m{i}"
        shutil.copytree(src, d)
        f = d / "model.safetensors"
        data = bytearray(f.read_bytes())
        data[rng.randrange(header)] ^= rng.randint(1, 255)
        f.write_bytes(bytes(data))
        try:
            dynamoq.load(d, TinyMoE(), verify=False)
        except CheckpointError:
            raised += 1
        shutil.rmtree(d)
    assert raised > 30


# ---- atomic saves --------------------------------------------------------------------------------------
KILL_SCRIPT = r'''
import os, random, shutil, signal, sys, time
import torch
torch.set_num_threads(1)
sys.path.insert(0, TESTS)
from conftest import build
import dynamoq, transformers
import safetensors.torch
from transformers import AutoModelForCausalLM
from dynamoq import checkpoint as ck
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

def quantized(bits):
    m = build("qwen3_moe")
    dynamoq.quantize_(m, dynamoq.DynaMoConfig(expert_bits={0: bits, 1: bits}, group_size=32))
    return m

def packed(m):
    return {k: [getattr(v, p) for p in v.__tensor_flatten__()[0]] for k, v in m.state_dict().items()
            if isinstance(v, dynamoq.DynaMoExperts)}

def same(a, b):
    return a.keys() == b.keys() and all(len(a[k]) == len(b[k]) and all(torch.equal(x, y) for x, y in zip(a[k], b[k]))
                                       for k in a)

A, B = quantized([2, 3, 4, 8]), quantized([8, 8, 4, 4])
ref = {"A": packed(A), "B": packed(B)}
d = os.path.join(sys.argv[1], "ckpt")
A.save_pretrained(d, max_shard_size="60KB")

def which(loader=lambda: AutoModelForCausalLM.from_pretrained(d)):
    got = packed(loader())
    return next(name for name, r in ref.items() if same(got, r))

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def killed(patch, model=B):
    pid = os.fork()
    if pid == 0:
        patch()
        model.save_pretrained(d, max_shard_size="60KB")
        os._exit(7)                      # the patch was supposed to kill us
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status

def half_write_then_die(n):
    import transformers.modeling_utils as mu
    calls = []
    orig = mu.safe_save_file
    def save(tensors, filename, metadata=None):
        calls.append(filename)
        orig(tensors, filename, metadata=metadata)
        if len(calls) == n:
            data = open(filename, "rb").read()
            open(filename, "wb").write(data[: len(data) // 2])
            die()
    mu.safe_save_file = save

def die_in_manifest():
    orig = ck._write_file
    def write(path, data):
        if path.endswith(ck.MANIFEST_NAME):
            open(path, "wb").write(data[: len(data) // 2])
            die()
        orig(path, data)
    ck._write_file = write

def die_before_swap():
    ck._swap = lambda tmp, target: die()

def die_between_renames():       # the non-Linux path: target moved aside, new one not yet in place
    ck._exchange = lambda a, b: False
    orig, n = os.rename, []
    def rename(a, b):
        n.append(a)
        if len(n) == 2:
            die()
        orig(a, b)
    os.rename = rename

for scenario in [lambda: half_write_then_die(1), lambda: half_write_then_die(3), die_in_manifest, die_before_swap]:
    killed(scenario)
    assert which() == "A"
killed(die_between_renames)
assert not os.path.exists(d)
assert which(lambda: dynamoq.load(d)) == "A"          # put back by dynamoq.load
# a kill from outside at arbitrary moments of a save
rng = random.Random(0)
for i in range(8):
    pid = os.fork()
    if pid == 0:
        while True:
            (B if i % 2 else A).save_pretrained(d, max_shard_size="60KB")
    time.sleep(rng.uniform(0.0, 0.4))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert which() in ("A", "B")
B.save_pretrained(d)
assert which() == "B"
left = [e for e in os.listdir(sys.argv[1]) if e != "ckpt"]
assert not left, left
print("ALL-KILLS-OK")
'''


def test_killed_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    script = f"TESTS = {str(TESTS)!r}\n" + KILL_SCRIPT
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ALL-KILLS-OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def test_loaded_model_can_be_dequantized(saved_qwen3):
    m = from_pretrained(saved_qwen3)
    x = tokens(m)
    with torch.no_grad():
        ref = m(x).logits
    m.dequantize()
    assert not dynamoq.checkpoint.has_packed_weights(m) and not hasattr(m.config, "quantization_config")
    with torch.no_grad():
        torch.testing.assert_close(m(x).logits, ref, atol=1e-5, rtol=1e-5)


def test_switching_cache_parts_round_trip_and_are_checked(tmp_path):
    import inspect

    if "cache_idx" not in inspect.signature(DynaMoExperts.from_float).parameters:
        pytest.skip("DynaMoExperts has no switching cache yet")
    idx = torch.stack([torch.randperm(64, generator=torch.Generator().manual_seed(e))[:4] for e in range(4)])
    m = TinyMoE()
    m.experts = nn.Parameter(DynaMoExperts.from_float(m.experts.data, (2, 3, 4, 8), 32, cache_idx=idx),
                             requires_grad=False)
    dynamoq.save(m, tmp_path)
    qc = json.loads((tmp_path / "dynamoq.json").read_text())["quantization_config"]
    assert set(qc["switching_cache"]["experts"]) == {n for n in m.experts.__tensor_flatten__()[0] if n.startswith("cache")}
    target = dynamoq.load(tmp_path, TinyMoE())
    assert_same(m, target)
    key = "_experts_cache_fp"                        # a cache part of the wrong shape (re-sealed on purpose)
    rewrite_weights(tmp_path, lambda t: t.update({key: t[key][:, :, :-1].contiguous()}))
    with pytest.raises(CheckpointError, match=f"{key}: found"):
        dynamoq.load(tmp_path, TinyMoE())
