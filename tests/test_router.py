"""MuonAdamW's router on real model families (emerging_optimizers/orthogonalized_optimizers/muon_adamw.py).

Hugging Face models (GPT-2, BERT, RoBERTa, T5, Llama, ViT) are built from tiny configs, without network; the
conv nets (ResNet with torchvision's names, a depthwise-separable net), a nanoGPT-style model with a tied head
and a plain MLP are written here. For each model: one assertion per parameter family (embeddings, position
embeddings, heads, hidden attention / MLP matrices, norms and biases, pooler, conv kernels), for the module form
``MuonAdamW(model)`` and for ``model.named_parameters()`` (where names alone decide otherwise, the case says so),
and one optimizer step. The Hugging Face cases skip without ``transformers``; the others always run.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from emerging_optimizers.orthogonalized_optimizers.muon_adamw import MuonAdamW, default_route

M, A = "matrix", "adamw"
VECTORS = ("norms and biases", "1-D", A, None)  # a family matched by ndim < 2 rather than by name


@dataclass
class Case:
    """A model, its loss on a tiny batch, and its parameter families ``(family, regex, side, side by names)``.

    Every parameter (tied duplicates included) must fall in one family; the first matching family counts. The
    fourth entry is the side with ``model.named_parameters()`` when names alone decide otherwise (else None).
    """

    build: Callable[[], nn.Module]
    loss: Callable[[nn.Module], torch.Tensor]
    families: list[tuple[str, str, str, str | None]]
    reasons: dict[str, str] = field(default_factory=dict)  # name -> summary()'s "why" (module form)
    named_reasons: dict[str, str] = field(default_factory=dict)  # the same with named_parameters()


def ids(vocab: int = 100, shape: tuple[int, int] = (2, 8)) -> torch.Tensor:
    return torch.randint(1, vocab, shape, generator=torch.Generator().manual_seed(0))


LABELS = torch.tensor([0, 2])


# ---------------------------------------------------------------------------------------------- Hugging Face
def hf(config_name: str, model_name: str, **config) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        transformers = pytest.importorskip("transformers")
        transformers.logging.set_verbosity_error()
        torch.manual_seed(0)
        return getattr(transformers, model_name)(getattr(transformers, config_name)(**config))

    return build


BERT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64)
GPT2 = dict(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
            pad_token_id=0)
LLAMA = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)

GPT2_BODY = [
    ("token embedding", r"^transformer\.wte\.weight$", A, None),
    ("position embedding", r"^transformer\.wpe\.weight$", A, None),
    ("hidden attention", r"\.attn\.c_(attn|proj)\.weight$", M, None),
    ("hidden MLP", r"\.mlp\.c_(fc|proj)\.weight$", M, None),
    VECTORS,
]
BERT_BODY = [
    ("word embedding", r"embeddings\.word_embeddings\.weight$", A, None),
    ("position embedding", r"embeddings\.position_embeddings\.weight$", A, None),
    ("token type embedding", r"embeddings\.token_type_embeddings\.weight$", A, None),
    ("hidden attention", r"\.attention\.(self\.(query|key|value)|output\.dense)\.weight$", M, None),
    ("hidden MLP", r"layer\.\d+\.(intermediate|output)\.dense\.weight$", M, None),
    VECTORS,
]
LLAMA_BODY = [
    ("token embedding", r"^model\.embed_tokens\.weight$", A, None),
    ("hidden attention", r"\.self_attn\.[qkvo]_proj\.weight$", M, None),
    ("hidden MLP", r"\.mlp\.(gate|up|down)_proj\.weight$", M, None),
    VECTORS,
]

HF_CASES = {
    "gpt2-lm": Case(
        hf("GPT2Config", "GPT2LMHeadModel", **GPT2), lambda m: m(input_ids=ids(), labels=ids()).loss,
        [("lm_head (tied to wte)", r"^lm_head\.weight$", A, None), *GPT2_BODY],
        reasons={"transformer.wte.weight": "nn.Embedding", "transformer.wpe.weight": "nn.Embedding"},
        named_reasons={"transformer.wte.weight": "embedding ('wte')"},
    ),
    "gpt2-seq": Case(
        hf("GPT2Config", "GPT2ForSequenceClassification", num_labels=3, **GPT2),
        lambda m: m(input_ids=ids(), labels=LABELS).loss,
        [("score head", r"^score\.weight$", A, None), *GPT2_BODY],
        reasons={"score.weight": "output head ('score')"},
    ),
    "bert-seq": Case(
        hf("BertConfig", "BertForSequenceClassification", num_labels=3, **BERT),
        lambda m: m(input_ids=ids(), labels=LABELS).loss,
        [("pooler (hidden x hidden)", r"^bert\.pooler\.dense\.weight$", M, None),
         ("classifier head", r"^classifier\.weight$", A, None), *BERT_BODY],
        reasons={"bert.pooler.dense.weight": "hidden matrix", "classifier.weight": "output head ('classifier')",
                 "bert.encoder.layer.0.attention.output.dense.weight": "hidden matrix"},
    ),
    "bert-mlm": Case(
        hf("BertConfig", "BertForMaskedLM", **BERT), lambda m: m(input_ids=ids(), labels=ids()).loss,
        [("MLM head transform", r"^cls\.predictions\.transform\.dense\.weight$", A, None),
         ("MLM decoder (tied to word embeddings)", r"^cls\.predictions\.decoder\.weight$", A, None), *BERT_BODY],
        reasons={"cls.predictions.transform.dense.weight": "output head ('cls')"},
    ),
    "bert-qa": Case(
        hf("BertConfig", "BertForQuestionAnswering", **BERT),
        lambda m: m(input_ids=ids(), start_positions=torch.tensor([1, 2]), end_positions=torch.tensor([3, 4])).loss,
        [("qa_outputs head", r"^qa_outputs\.weight$", A, None), *BERT_BODY],
        reasons={"qa_outputs.weight": "output head ('qa_outputs')"},
    ),
    "roberta-seq": Case(
        hf("RobertaConfig", "RobertaForSequenceClassification", num_labels=3,
           **{**BERT, "max_position_embeddings": 66}),
        lambda m: m(input_ids=ids(), labels=LABELS).loss,
        [("classifier head (dense and out_proj)", r"^classifier\.(dense|out_proj)\.weight$", A, None),
         *BERT_BODY],
        reasons={"classifier.out_proj.weight": "output head ('classifier')"},
    ),
    "t5": Case(
        hf("T5Config", "T5ForConditionalGeneration", vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2,
           num_heads=2, decoder_start_token_id=0, pad_token_id=0),
        lambda m: m(input_ids=ids(), labels=ids(shape=(2, 5))).loss,
        [("shared embedding", r"^shared\.weight$", A, None),
         ("embed_tokens and lm_head (tied to shared)", r"^((en|de)coder\.embed_tokens|lm_head)\.weight$", A, None),
         ("relative position bias", r"\.relative_attention_bias\.weight$", A, None),
         ("hidden attention", r"\.(SelfAttention|EncDecAttention)\.[qkvo]\.weight$", M, None),
         ("hidden MLP", r"\.DenseReluDense\.w[io]\.weight$", M, None),
         VECTORS],
        reasons={"shared.weight": "nn.Embedding"},
        named_reasons={"shared.weight": "embedding ('shared')",
                       "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
                           "embedding ('relative_attention_bias')"},
    ),
    "llama-lm": Case(
        hf("LlamaConfig", "LlamaForCausalLM", tie_word_embeddings=False, **LLAMA),
        lambda m: m(input_ids=ids(), labels=ids()).loss,
        [("lm_head", r"^lm_head\.weight$", A, None), *LLAMA_BODY],
        reasons={"lm_head.weight": "output head ('lm_head')"},
    ),
    "llama-lm-tied": Case(
        hf("LlamaConfig", "LlamaForCausalLM", tie_word_embeddings=True, **LLAMA),
        lambda m: m(input_ids=ids(), labels=ids()).loss,
        [("lm_head (tied to embed_tokens)", r"^lm_head\.weight$", A, None), *LLAMA_BODY],
    ),
    "llama-seq": Case(
        hf("LlamaConfig", "LlamaForSequenceClassification", num_labels=3, **LLAMA),
        lambda m: m(input_ids=ids(), labels=LABELS).loss,
        [("score head", r"^score\.weight$", A, None), *LLAMA_BODY],
    ),
    "vit": Case(
        hf("ViTConfig", "ViTForImageClassification", image_size=16, patch_size=4, num_channels=3, hidden_size=32,
           num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3),
        lambda m: m(pixel_values=torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)),
                    labels=LABELS).loss,
        [("class token", r"\.cls_token$", A, None),
         ("position embedding", r"\.position_embeddings$", A, None),
         ("patch embedding (conv stem named as an embedding)", r"\.patch_embeddings\.projection\.weight$", A, None),
         ("hidden attention", r"\.attention\.(.*\.)?(q_proj|k_proj|v_proj|o_proj|query|key|value|dense)\.weight$",
          M, None),
         ("hidden MLP", r"\.(mlp\.fc[12]|intermediate\.dense|output\.dense)\.weight$", M, None),
         ("classifier head", r"^classifier\.weight$", A, None),
         VECTORS],
        reasons={"vit.embeddings.cls_token": "vector-shaped", "classifier.weight": "output head ('classifier')"},
    ),
}


# ---------------------------------------------------------------------------------------------- written here
class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock, with its names."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet(nn.Module):
    """torchvision's ResNet layout and names (stem conv1/bn1, layer1.., avgpool, fc), two stages of two blocks."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, stride=2), BasicBlock(16, 16))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class SeparableBlock(nn.Module):
    """Depthwise 3x3 conv (groups = channels), a per-channel 1x1 depthwise gain, a pointwise 1x1 conv."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False)
        self.gain = nn.Conv2d(c_in, c_in, 1, groups=c_in, bias=False)  # weight [C, 1, 1, 1]: a vector
        self.bn1 = nn.BatchNorm2d(c_in)
        self.pw = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.gain(self.dw(x))))
        return F.relu(self.bn2(self.pw(x)))


class SeparableNet(nn.Module):
    """MobileNet-style: conv stem, depthwise-separable blocks, a hidden Linear, and a ``pooler`` that projects to
    the labels (a head by rule 4 only: ``num_classes`` is known to the module form, not to names)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.num_classes = 10
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(SeparableBlock(8, 16), SeparableBlock(16, 16))
        self.proj = nn.Linear(16, 16)
        self.pooler = nn.Linear(16, self.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.stem(x))).mean((2, 3))
        return self.pooler(torch.tanh(self.proj(x)))


class Block(nn.Module):
    """nanoGPT's block, plus a 2-way gate (a hidden Linear with out_features 2, HF's default ``num_labels``)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.ModuleDict(dict(c_attn=nn.Linear(d, 3 * d), c_proj=nn.Linear(d, d)))
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(d, 4 * d), c_proj=nn.Linear(4 * d, d)))
        self.gate = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.attn["c_attn"](self.ln_1(x)).chunk(3, dim=-1)
        x = x + self.attn["c_proj"](F.scaled_dot_product_attention(q, k, v, is_causal=True))
        g = torch.softmax(self.gate(x), -1)[..., :1]
        return x + g * self.mlp["c_proj"](F.gelu(self.mlp["c_fc"](self.ln_2(x))))


class NanoGPT(nn.Module):
    """nanoGPT's layout and names, head tied to ``wte``. ``config`` also carries ``num_labels=2`` (HF's default):
    the blocks' 2-way gates must stay matrices, only the last Linear of an output size counts.

    ``lm_head=False``: no head module, logits ``x @ wte.weight.T``, and a context as long as the width (32), so
    the hidden ``c_proj`` (out_features 32) has an output size by chance; it must stay a matrix too.
    """

    def __init__(self, lm_head: bool = True, vocab: int = 100, d: int = 32) -> None:
        super().__init__()
        torch.manual_seed(0)
        block = 16 if lm_head else d
        self.config = SimpleNamespace(vocab_size=vocab, block_size=block, **({"num_labels": 2} if lm_head else {}))
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(vocab, d), wpe=nn.Embedding(block, d),
                                              h=nn.ModuleList([Block(d) for _ in range(2)]), ln_f=nn.LayerNorm(d)))
        self.lm_head = nn.Linear(d, vocab, bias=False) if lm_head else None
        if self.lm_head is not None:
            self.transformer.wte.weight = self.lm_head.weight  # nanoGPT's weight tying

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = self.transformer
        x = t.wte(idx) + t.wpe(torch.arange(idx.shape[1]))
        for block in t.h:
            x = block(x)
        x = t.ln_f(x)
        return self.lm_head(x) if self.lm_head is not None else x @ t.wte.weight.T


class TiedLM(nn.Module):
    """``embed.weight = head.weight`` with the head registered first: named_parameters() calls it head.weight."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(16, 50, bias=False)
        self.embed = nn.Embedding(50, 16)
        self.embed.weight = self.head.weight
        self.mix = nn.Linear(16, 16)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(idx))))


class OddHeadLM(nn.Module):
    """An untied LM whose head has no head name (``out``): rule 4 finds it by the embedding's size."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tok = nn.Embedding(50, 16)
        self.mix = nn.Linear(16, 16)
        self.out = nn.Linear(16, 50)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(self.tok(idx))))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def lm_loss(model: nn.Module, vocab: int = 100) -> torch.Tensor:
    x = ids(vocab)
    return F.cross_entropy(model(x).flatten(0, 1), x.flatten())


def image_loss(model: nn.Module) -> torch.Tensor:
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return F.cross_entropy(model(x), LABELS)


LOCAL_CASES = {
    "resnet": Case(
        ResNet, image_loss,
        [("stem conv", r"^conv1\.weight$", M, None),
         ("block conv kernels", r"^layer\d\.\d\.conv[12]\.weight$", M, None),
         ("downsample 1x1 conv", r"\.downsample\.0\.weight$", M, None),
         ("fc head", r"^fc\.weight$", A, None),
         VECTORS],
        reasons={"fc.weight": "output head ('fc')", "layer2.0.downsample.0.weight": "hidden matrix"},
        named_reasons={"fc.weight": "output head ('fc')"},
    ),
    "depthwise-separable": Case(
        SeparableNet, image_loss,
        [("stem conv", r"^stem\.weight$", M, None),
         ("depthwise 3x3 kernels [C, 1, 3, 3]", r"\.dw\.weight$", M, None),
         ("per-channel 1x1 depthwise gains [C, 1, 1, 1]", r"\.gain\.weight$", A, None),
         ("pointwise 1x1 convs", r"\.pw\.weight$", M, None),
         ("hidden Linear", r"^proj\.weight$", M, None),
         ("pooler projecting to the labels", r"^pooler\.weight$", A, M),
         VECTORS],
        reasons={"pooler.weight": "last Linear, out_features == num_classes 10",
                 "blocks.0.gain.weight": "vector-shaped"},
        named_reasons={"pooler.weight": "hidden matrix"},
    ),
    "nanogpt-tied": Case(
        NanoGPT, lm_loss,
        [("token embedding", r"^transformer\.wte\.weight$", A, None),
         ("position embedding", r"^transformer\.wpe\.weight$", A, None),
         ("lm_head (tied to wte)", r"^lm_head\.weight$", A, None),
         ("hidden attention", r"\.attn\.c_(attn|proj)\.weight$", M, None),
         ("hidden MLP", r"\.mlp\.c_(fc|proj)\.weight$", M, None),
         ("2-way gates (out_features == num_labels 2, not last)", r"\.gate\.weight$", M, None),
         VECTORS],
        reasons={"transformer.wte.weight": "nn.Embedding", "transformer.h.1.gate.weight": "hidden matrix"},
    ),
    "nanogpt-no-head-module": Case(
        lambda: NanoGPT(lm_head=False), lm_loss,
        [("token embedding (also the head)", r"^transformer\.wte\.weight$", A, None),
         ("position embedding", r"^transformer\.wpe\.weight$", A, None),
         ("hidden attention", r"\.attn\.c_(attn|proj)\.weight$", M, None),
         ("hidden MLP (c_proj: out_features == 32 positions, a hidden width)", r"\.mlp\.c_(fc|proj)\.weight$", M,
          None),
         ("gates", r"\.gate\.weight$", M, None),
         VECTORS],
        reasons={"transformer.h.1.mlp.c_proj.weight": "hidden matrix"},
    ),
    "tied-embed-head": Case(
        TiedLM, lambda m: lm_loss(m, 50),
        [("tied head / embedding", r"^(head|embed)\.weight$", A, None),
         ("hidden Linear", r"^mix\.weight$", M, None),
         VECTORS],
        reasons={"head.weight": "nn.Embedding"},
        named_reasons={"head.weight": "output head ('head')"},
    ),
    "odd-head-name-lm": Case(
        OddHeadLM, lambda m: lm_loss(m, 50),
        [("embedding", r"^tok\.weight$", A, M),  # "tok" is no embedding name: only the module type tells
         ("hidden Linear", r"^mix\.weight$", M, None),
         ("head named 'out'", r"^out\.weight$", A, M),
         VECTORS],
        reasons={"out.weight": "last Linear, out_features == nn.Embedding size 50", "tok.weight": "nn.Embedding"},
    ),
    "mlp": Case(
        mlp, lambda m: F.cross_entropy(m(torch.randn(2, 8, generator=torch.Generator().manual_seed(0))), LABELS),
        [("hidden Linears", r"^[02]\.weight$", M, None),
         ("last Linear (no output size declared)", r"^4\.weight$", A, M),
         VECTORS],
        reasons={"4.weight": "last Linear (the model declares no output size)", "2.weight": "hidden matrix"},
    ),
}

CASES = {**HF_CASES, **LOCAL_CASES}


# ---------------------------------------------------------------------------------------------- helpers
def side_by_id(opt: MuonAdamW) -> dict[int, str]:
    return {id(p): g["side"] for g in opt.param_groups for p in g["params"]}


def reasons(opt: MuonAdamW) -> dict[str, str]:
    """name -> the "why" column of ``summary()``."""
    lines = opt.summary().splitlines()
    name_at, shape_at, why_at = (lines[1].index(column) for column in ("name", "shape", "why"))
    return {row[name_at:shape_at].strip(): row[why_at:].strip() for row in lines[2:]}


def check_families(model: nn.Module, opt: MuonAdamW, case: Case, named: bool) -> None:
    sides = side_by_id(opt)
    members: dict[str, list[tuple[str, str]]] = {family: [] for family, *_ in case.families}
    unmatched = []
    for name, p in model.named_parameters(remove_duplicate=False):  # tied duplicates too: by tensor identity
        for family, pattern, _, _ in case.families:
            if (p.ndim < 2) if pattern == "1-D" else re.search(pattern, name):
                members[family].append((name, sides[id(p)]))
                break
        else:
            unmatched.append(name)
    assert not unmatched, f"parameters in no family: {unmatched}"
    for family, _, side, named_side in case.families:
        want = named_side if named and named_side else side
        wrong = [n for n, s in members[family] if s != want]
        assert members[family] and not wrong, f"{family}: {wrong or 'no parameters'} (expected the {want} side)"


def build_quietly(case: Case) -> nn.Module:
    model = case.build()
    model.train()
    return model


# ---------------------------------------------------------------------------------------------- routing
@pytest.mark.parametrize("name", list(CASES))
def test_module_form_routes_every_family(name):
    case = CASES[name]
    model = build_quietly(case)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # named params: no warning
        opt = MuonAdamW(model)
    check_families(model, opt, case, named=False)
    why = reasons(opt)
    for param, reason in case.reasons.items():
        assert why[param] == reason, (param, why[param])


@pytest.mark.parametrize("name", list(CASES))
def test_named_parameters_route_by_names(name):
    case = CASES[name]
    model = build_quietly(case)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = MuonAdamW(model.named_parameters())
    check_families(model, opt, case, named=True)
    why = reasons(opt)
    for param, reason in case.named_reasons.items():
        assert why[param] == reason, (param, why[param])


@pytest.mark.parametrize("name", list(CASES))
def test_one_step_on_each_model(name):
    case = CASES[name]
    model = build_quietly(case)
    opt = MuonAdamW(model, lr=0.02, adamw_lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = case.loss(model)
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    named = dict(model.named_parameters())
    assert all(torch.isfinite(p).all() for p in named.values())
    for side in ("matrix", "adamw"):
        names = [n for g in opt.param_groups if g["side"] == side for n in g["param_names"]]
        assert names, f"no parameter on the {side} side"
        assert any(not torch.equal(before[n], named[n]) for n in names), f"the {side} side did not move"


@pytest.mark.parametrize(
    "name, shape, side",
    [
        ("fc.weight", (10, 16), A),  # torchvision ResNet's head
        ("AuxLogits.fc.weight", (10, 16), A),  # Inception's auxiliary classifier
        ("blocks.0.fc.weight", (16, 16), M),  # an fc inside a numbered block is hidden
        ("layer4.1.fc.weight", (16, 16), M),
        ("output.weight", (100, 16), A),  # Llama's (Meta layout) head
        ("layers.0.attention.output.weight", (16, 16), M),
        ("bert.encoder.layer.0.output.dense.weight", (16, 64), M),
        ("score.weight", (3, 16), A),
        ("qa_outputs.weight", (2, 16), A),
        ("cls.predictions.transform.dense.weight", (16, 16), A),
        ("classifier.dense.weight", (16, 16), A),
        ("bert.pooler.dense.weight", (16, 16), M),
        ("shared.weight", (100, 16), A),  # T5
        ("model.shared.weight", (100, 16), A),  # BART
        ("model.layers.0.mlp.shared_experts.gate_proj.weight", (32, 16), M),  # DeepSeek's shared experts
        ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", (32, 4), A),
        ("tok_embeddings.weight", (100, 16), A),
        ("blocks.0.dw.weight", (16, 1, 3, 3), M),  # depthwise kernel: a 16 x 9 matrix
        ("blocks.0.gain.weight", (16, 1, 1, 1), A),  # 1x1 depthwise: a per-channel gain
        ("", (16, 16), A),  # no name: the conservative side
        ("", (16,), A),
    ],
)
def test_default_route_on_real_names(name, shape, side):
    assert default_route(name, torch.zeros(shape)) == side


# ---------------------------------------------------------------------------------------------- unnamed params
def test_unnamed_params_warn_once_and_go_to_adamw():
    model = mlp()
    with pytest.warns(UserWarning, match=r"no name.*MuonAdamW\(model\).*named_parameters\(\)") as record:
        opt = MuonAdamW(model.parameters())
    assert len([w for w in record if issubclass(w.category, UserWarning)]) == 1  # once, not once per matrix
    assert record[0].filename == __file__  # points at the caller
    assert [g["side"] for g in opt.param_groups] == ["adamw"]
    why = reasons(opt)
    assert [why[f"<param {i}>"] for i in range(6)] == ["unnamed: conservative side", "1-D"] * 3
    opt.zero_grad()
    F.cross_entropy(model(torch.randn(2, 8)), LABELS).backward()
    opt.step()

    # Unnamed tensors in an unpinned group (beside a pinned one): warned about once, AdamW.
    weights = [p for p in model.parameters() if p.ndim == 2]
    with pytest.warns(UserWarning, match="no name") as record:
        opt = MuonAdamW([{"params": weights[:1], "side": "matrix"}, {"params": weights[1:], "lr": 0.1}])
    assert len(record) == 1
    assert [(g["side"], len(g["params"])) for g in opt.param_groups] == [("matrix", 1), ("adamw", 2)]


def test_no_warning_for_pinned_groups_route_or_vectors():
    model = mlp()
    weights = [p for p in model.parameters() if p.ndim == 2]
    biases = [p for p in model.parameters() if p.ndim == 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = MuonAdamW([{"params": weights, "side": "matrix"}, {"params": biases, "side": "adamw"}])
        assert [g["side"] for g in opt.param_groups] == ["matrix", "adamw"]
        opt = MuonAdamW([{"params": weights[:2], "use_muon": True}, {"params": weights[2:] + biases,
                                                                    "use_muon": False}])
        assert [g["side"] for g in opt.param_groups] == ["matrix", "adamw"]
        opt = MuonAdamW(model.parameters(), route=lambda n, p: "matrix" if p.ndim >= 2 else "adamw")
        assert [len(g["params"]) for g in opt.param_groups] == [3, 3]
        MuonAdamW(biases)  # vectors: no name needed, AdamW anyway
        MuonAdamW(model)
        MuonAdamW(model.named_parameters())
