"""transformers v4 REALM checkpoints -> hf_kadapter.

State dicts are built in the v4 layouts (RealmEmbedder, RealmKnowledgeAugEncoder, RealmReader, and RealmForOpenQA
which nests an embedder and a reader), tiny and random, converted, and compared with an independent forward of
REALM written below in plain torch from its maths: BERT with gelu_new and post-LayerNorm; the embedder's
LayerNorm(dense(tanh(pooler([CLS])))); the MLM head; the reader's span score
dense_output(LayerNorm(relu(start(h_s) + end(h_e)))) plus the retrieval score, for spans inside the evidence block.
"""

from __future__ import annotations

import json
import math
import runpy
import sys

import pytest
import torch
from safetensors.torch import save_file
from transformers import BertForMaskedLM

from hf_kadapter.retrieval.convert_realm_v4 import (
    convert_realm_v4_embedder,
    convert_realm_v4_encoder,
    convert_realm_v4_reader,
    main,
)
from hf_kadapter.retrieval.modeling_retriever import RetrieverEmbedder
from hf_kadapter.retrieval.reader import OpenQAReader

CONFIG = {
    "model_type": "realm",
    "vocab_size": 40,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 24,
    "max_position_embeddings": 24,
    "type_vocab_size": 2,
    "retriever_proj_size": 8,
    "span_hidden_size": 6,
    "max_span_width": 3,
    # hidden_act, layer_norm_eps (1e-12) and reader_layer_norm_eps (1e-3) left to RealmConfig's defaults
}
EPS, READER_EPS = 1e-12, 1e-3


# ----- the v4 layouts ----------------------------------------------------------------------------------------------
class Maker:
    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.state: dict[str, torch.Tensor] = {}

    def randn(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        return scale * torch.randn(*shape, generator=self.generator)

    def linear(self, name: str, out_features: int, in_features: int) -> None:
        self.state[f"{name}.weight"] = self.randn(out_features, in_features, scale=1 / math.sqrt(in_features))
        self.state[f"{name}.bias"] = self.randn(out_features, scale=0.1)

    def norm(self, name: str, size: int) -> None:
        self.state[f"{name}.weight"] = 1 + self.randn(size, scale=0.1)
        self.state[f"{name}.bias"] = self.randn(size, scale=0.1)

    def realm_bert(self, prefix: str) -> None:
        """RealmBertModel: embeddings, encoder layers, pooler (and the position_ids buffer v4 files carry)."""
        h, c = CONFIG["hidden_size"], CONFIG
        self.state[prefix + "embeddings.word_embeddings.weight"] = self.randn(c["vocab_size"], h)
        self.state[prefix + "embeddings.position_embeddings.weight"] = self.randn(c["max_position_embeddings"], h)
        self.state[prefix + "embeddings.token_type_embeddings.weight"] = self.randn(c["type_vocab_size"], h)
        self.state[prefix + "embeddings.position_ids"] = torch.arange(c["max_position_embeddings"])[None]
        self.norm(prefix + "embeddings.LayerNorm", h)
        for layer in range(c["num_hidden_layers"]):
            p = f"{prefix}encoder.layer.{layer}."
            for part in ("query", "key", "value"):
                self.linear(p + f"attention.self.{part}", h, h)
            self.linear(p + "attention.output.dense", h, h)
            self.norm(p + "attention.output.LayerNorm", h)
            self.linear(p + "intermediate.dense", c["intermediate_size"], h)
            self.linear(p + "output.dense", h, c["intermediate_size"])
            self.norm(p + "output.LayerNorm", h)
        self.linear(prefix + "pooler.dense", h, h)

    def mlm_head(self, prefix: str, tied_to: str) -> None:
        h = CONFIG["hidden_size"]
        self.linear(prefix + "predictions.transform.dense", h, h)
        self.norm(prefix + "predictions.transform.LayerNorm", h)
        self.state[prefix + "predictions.bias"] = self.randn(CONFIG["vocab_size"], scale=0.1)
        self.state[prefix + "predictions.decoder.weight"] = self.state[tied_to + "embeddings.word_embeddings.weight"]

    def embedder(self, prefix: str = "") -> None:
        self.realm_bert(prefix + "realm.")
        self.mlm_head(prefix + "cls.", prefix + "realm.")  # RealmScorerProjection holds an (unused) LM head too
        self.linear(prefix + "cls.dense", CONFIG["retriever_proj_size"], CONFIG["hidden_size"])
        self.norm(prefix + "cls.LayerNorm", CONFIG["retriever_proj_size"])

    def reader(self, prefix: str = "") -> None:
        self.realm_bert(prefix + "realm.")
        self.mlm_head(prefix + "cls.", prefix + "realm.")
        span = CONFIG["span_hidden_size"]
        self.linear(prefix + "qa_outputs.dense_intermediate", 2 * span, CONFIG["hidden_size"])
        self.linear(prefix + "qa_outputs.dense_output", 1, span)
        self.norm(prefix + "qa_outputs.layer_normalization", span)


def realm_state(kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    maker = Maker(seed)
    if kind == "embedder":
        maker.embedder()
    elif kind == "encoder":
        maker.realm_bert("realm.")
        maker.mlm_head("cls.", "realm.")
    elif kind == "reader":
        maker.reader()
    elif kind == "openqa":  # RealmForOpenQA: embedder + reader + the block embeddings buffer
        maker.embedder("embedder.")
        maker.reader("reader.")
        maker.state["block_emb"] = maker.randn(5, CONFIG["retriever_proj_size"])
    return maker.state


# ----- REALM's forward, from its maths -----------------------------------------------------------------------------
def gelu_new(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def norm(x: torch.Tensor, t: dict, name: str, eps: float = EPS) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    variance = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(variance + eps) * t[f"{name}.weight"] + t[f"{name}.bias"]


def dense(x: torch.Tensor, t: dict, name: str) -> torch.Tensor:
    return x @ t[f"{name}.weight"].T + t[f"{name}.bias"]


def realm_bert(t: dict, p: str, ids: torch.Tensor, types: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    batch, length = ids.shape
    heads = CONFIG["num_attention_heads"]
    size = CONFIG["hidden_size"] // heads
    x = (
        t[p + "embeddings.word_embeddings.weight"][ids]
        + t[p + "embeddings.position_embeddings.weight"][torch.arange(length)]
        + t[p + "embeddings.token_type_embeddings.weight"][types]
    )
    x = norm(x, t, p + "embeddings.LayerNorm")
    bias = (1.0 - mask[:, None, None, :].float()) * -10000.0
    for layer in range(CONFIG["num_hidden_layers"]):
        q_ = f"{p}encoder.layer.{layer}."

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(batch, length, heads, size).transpose(1, 2)

        q, k, v = (split(dense(x, t, q_ + f"attention.self.{part}")) for part in ("query", "key", "value"))
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(size) + bias, dim=-1)
        context = (probs @ v).transpose(1, 2).reshape(batch, length, -1)
        x = norm(dense(context, t, q_ + "attention.output.dense") + x, t, q_ + "attention.output.LayerNorm")
        ffn = dense(gelu_new(dense(x, t, q_ + "intermediate.dense")), t, q_ + "output.dense")
        x = norm(ffn + x, t, q_ + "output.LayerNorm")
    return x


def realm_embed(t: dict, p: str, ids, types, mask) -> torch.Tensor:
    pooled = torch.tanh(dense(realm_bert(t, p + "realm.", ids, types, mask)[:, 0], t, p + "realm.pooler.dense"))
    return norm(dense(pooled, t, p + "cls.dense"), t, p + "cls.LayerNorm")


def realm_mlm_logits(t: dict, ids, types, mask) -> torch.Tensor:
    hidden = realm_bert(t, "realm.", ids, types, mask)
    x = norm(gelu_new(dense(hidden, t, "cls.predictions.transform.dense")), t, "cls.predictions.transform.LayerNorm")
    return x @ t["cls.predictions.decoder.weight"].T + t["cls.predictions.bias"]


def realm_span_logits(t: dict, p: str, ids, types, mask, relevance) -> dict[tuple[int, int, int], float]:
    """{(document, start, end): logit} of RealmReader for every candidate span inside the evidence block."""
    hidden = realm_bert(t, p + "realm.", ids, types, mask)
    start, end = dense(hidden, t, p + "qa_outputs.dense_intermediate").chunk(2, dim=-1)
    block = types.clone()
    block[:, -1] = 0
    logits = {}
    for doc in range(ids.shape[0]):
        for width in range(1, CONFIG["max_span_width"] + 1):
            for s in range(ids.shape[1] - width + 1):
                e = s + width - 1
                if block[doc, s] and block[doc, e]:
                    h = norm(
                        torch.relu(start[doc, s] + end[doc, e]), t, p + "qa_outputs.layer_normalization", READER_EPS
                    )
                    logits[(doc, s, e)] = float(dense(h, t, p + "qa_outputs.dense_output")) + float(relevance[doc])
    return logits


IDS = torch.tensor([[2, 11, 17, 3, 25, 9, 30, 12, 3], [2, 8, 3, 19, 5, 14, 3, 0, 0]])
TYPES = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 0, 0]])
MASK = torch.tensor([[1] * 9, [1] * 7 + [0, 0]])  # the second example is padded


# ----- tests -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["embedder", "openqa"])
def test_embedder_matches_realm(layout):
    state = realm_state(layout)
    model = convert_realm_v4_embedder(state, config=CONFIG)
    assert model.config.pooling == "pooler" and model.config.projection_dim == 8 and model.config.shared
    prefix = "embedder." if layout == "openqa" else ""
    expected = realm_embed(state, prefix, IDS, TYPES, MASK)
    with torch.no_grad():
        queries = model.embed_queries(IDS, MASK, TYPES)
        documents = model.embed_documents(IDS, MASK, TYPES)
    torch.testing.assert_close(queries, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(documents, expected, atol=1e-5, rtol=1e-5)


def test_encoder_matches_realm_knowledge_augmented_mlm(tmp_path):
    state = realm_state("encoder", seed=1)
    model = convert_realm_v4_encoder(state, config=CONFIG, output_dir=tmp_path / "mlm")
    assert isinstance(model, BertForMaskedLM) and model.config.hidden_act == "gelu_new"
    with torch.no_grad():
        logits = model(input_ids=IDS, token_type_ids=TYPES, attention_mask=MASK).logits
    expected = realm_mlm_logits(state, IDS, TYPES, MASK)
    real = MASK.bool()
    torch.testing.assert_close(logits[real], expected[real], atol=1e-4, rtol=1e-5)
    reloaded = BertForMaskedLM.from_pretrained(tmp_path / "mlm").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS, token_type_ids=TYPES, attention_mask=MASK).logits, logits)


@pytest.mark.parametrize("layout", ["reader", "openqa"])
def test_reader_span_scores_match_realm(layout, tmp_path):
    state = realm_state(layout, seed=2)
    reader = convert_realm_v4_reader(state, config=CONFIG, output_dir=tmp_path / "reader")
    assert OpenQAReader.from_pretrained(tmp_path / "reader").config.span_layer_norm_eps == READER_EPS
    assert reader.max_span_width == 3 and reader.span_norm is not None
    doc_mask = TYPES.clone()
    doc_mask[:, -1] = 0  # REALM's block mask: the evidence tokens, never the last position
    relevance = torch.tensor([0.7, -1.3])
    with torch.no_grad():
        out = reader(
            input_ids=IDS[None], attention_mask=MASK[None], token_type_ids=TYPES[None], doc_mask=doc_mask[None],
            retrieval_scores=relevance[None],
        )  # fmt: skip
    ours = out.span_logits[0]  # [k, L, W]
    prefix = "reader." if layout == "openqa" else ""
    expected = realm_span_logits(state, prefix, IDS, TYPES, MASK, relevance)
    assert len(expected) >= 10
    for (doc, start, end), logit in expected.items():
        assert ours[doc, start, end - start].item() == pytest.approx(logit, abs=1e-4), (doc, start, end)
    valid = ours > -1e8
    assert int(valid.sum()) == len(expected)  # no other span is scored
    reloaded = OpenQAReader.from_pretrained(tmp_path / "reader").eval()  # the span LayerNorm survives save/load
    with torch.no_grad():
        again = reloaded(
            input_ids=IDS[None], attention_mask=MASK[None], token_type_ids=TYPES[None], doc_mask=doc_mask[None],
            retrieval_scores=relevance[None],
        ).span_logits[0]  # fmt: skip
    assert torch.equal(again, ours)


def test_cli_from_checkpoint_folders_and_back(tmp_path, capsys):
    """Hub-like folders (config.json + pytorch_model.bin / model.safetensors), converted by the CLI."""
    embedder_dir, encoder_dir = tmp_path / "realm-embedder", tmp_path / "realm-encoder"
    for folder in (embedder_dir, encoder_dir):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(CONFIG))
    state = realm_state("embedder", seed=3)
    torch.save(state, embedder_dir / "pytorch_model.bin")
    encoder_state = realm_state("encoder", seed=4)
    encoder_state["cls.predictions.decoder.weight"] = encoder_state["cls.predictions.decoder.weight"].clone()
    save_file(encoder_state, encoder_dir / "model.safetensors")

    main(["embedder", str(embedder_dir), str(tmp_path / "embedder-out")])
    main(["encoder", str(encoder_dir / "model.safetensors"), str(tmp_path / "encoder-out")])
    assert capsys.readouterr().out.count("saved ") == 2
    embedder = RetrieverEmbedder.from_pretrained(tmp_path / "embedder-out").eval()
    with torch.no_grad():
        embeddings = embedder.embed_documents(IDS, MASK, TYPES)
    torch.testing.assert_close(embeddings, realm_embed(state, "", IDS, TYPES, MASK), atol=1e-5, rtol=1e-5)
    encoder = BertForMaskedLM.from_pretrained(tmp_path / "encoder-out").eval()
    with torch.no_grad():
        logits = encoder(input_ids=IDS[:1], token_type_ids=TYPES[:1]).logits
    torch.testing.assert_close(
        logits, realm_mlm_logits(encoder_state, IDS[:1], TYPES[:1], MASK[:1]), atol=1e-4, rtol=1e-5
    )


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # run in-process after the tests imported the module
def test_module_cli_help(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["convert_realm_v4", "--help"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_module("hf_kadapter.retrieval.convert_realm_v4", run_name="__main__")
    assert stop.value.code == 0 and "{embedder,reader,encoder}" in capsys.readouterr().out


def test_wrong_layouts_name_the_problem_and_the_fix(tmp_path):
    with pytest.raises(
        ValueError, match=r"RealmEmbedder.*looks like a REALM reader checkpoint: use convert_realm_v4_reader"
    ):
        convert_realm_v4_embedder(realm_state("reader"), config=CONFIG)
    with pytest.raises(ValueError, match=r"looks like a REALM embedder checkpoint: use convert_realm_v4_embedder"):
        convert_realm_v4_reader(realm_state("embedder"), config=CONFIG)
    with pytest.raises(ValueError, match=r"No REALM config .* config\.json beside it, or pass config="):
        convert_realm_v4_embedder(realm_state("embedder"))
    with pytest.raises(ValueError, match=r"num_hidden_layers: config 3, tensors 2"):
        convert_realm_v4_embedder(realm_state("embedder"), config={**CONFIG, "num_hidden_layers": 3})
    broken = {k: v for k, v in realm_state("reader").items() if "layer_normalization" not in k}
    with pytest.raises(ValueError, match=r"lacks the reader span scorer tensors \['qa_outputs.layer_normalization"):
        convert_realm_v4_reader(broken, config=CONFIG)
    damaged = {k: v for k, v in realm_state("encoder").items() if "layer.1.output.dense" not in k}
    with pytest.raises(
        ValueError, match=r"does not fill the BertForMaskedLM exactly: missing \['bert.encoder.layer.1.output.dense"
    ):
        convert_realm_v4_encoder(damaged, config=CONFIG)
    with pytest.raises(ValueError, match="model_type 'bert'"):
        convert_realm_v4_encoder(realm_state("encoder"), config={**CONFIG, "model_type": "bert"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor pytorch_model.bin"):
        convert_realm_v4_embedder(tmp_path / "empty")


def test_embedder_pooler_pooling_from_an_encoder_keeps_its_pooler(tmp_path):
    """pooling="pooler" (what REALM's embedder needs) loads the encoder's pooler instead of dropping it."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=24, max_position_embeddings=24)).eval()  # fmt: skip
    bert.save_pretrained(tmp_path / "bert")
    pooled = RetrieverEmbedder.from_encoder(tmp_path / "bert", pooling="pooler", projection_dim=None).eval()
    plain = RetrieverEmbedder.from_encoder(tmp_path / "bert", projection_dim=None).eval()
    assert not hasattr(plain.query_tower.encoder, "pooler") or plain.query_tower.encoder.pooler is None
    with torch.no_grad():
        expected = bert(input_ids=IDS, attention_mask=MASK).pooler_output
        torch.testing.assert_close(pooled.embed_queries(IDS, MASK), expected)
        torch.testing.assert_close(
            plain.embed_queries(IDS, MASK), bert(input_ids=IDS, attention_mask=MASK).last_hidden_state[:, 0]
        )
