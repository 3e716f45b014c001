"""Feature cache of the frozen base's hidden states: exactness, Trainer path, keys, resume, dtypes, refusals."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle

import numpy as np
import pytest
import torch
from conftest import VOCAB, make_model, tiny_adapter
from datasets import Dataset
from transformers import BertConfig, BertModel, Trainer, TrainingArguments

import hf_kadapter as hk
from hf_kadapter.kadapter.feature_cache import (
    CACHE_INDEX_COLUMN,
    CachedFeatureCollator,
    FeatureCache,
    build_feature_cache,
    cached_hidden_state_indices,
    feature_cache_key,
)
from hf_kadapter.utils.io import BUILD_LOCK_NAME

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
PAD_ID = 1


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run as fast on one thread, and a busy machine does not stall them at OpenMP barriers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def toy_rows(
    size: int = 24, seed: int = 0, max_length: int = 12, pad_to: int | None = None, segments: bool = False
) -> dict[str, list]:
    """Ragged relation rows (lengths 5..max_length); `pad_to` right-pads them like padding="max_length";
    `segments` adds token_type_ids (a sentence pair: 0s then 1s)."""
    generator = torch.Generator().manual_seed(seed)
    columns: dict[str, list] = {k: [] for k in ("input_ids", "attention_mask", "subject_positions", "object_positions")}
    columns["labels"] = []
    for _ in range(size):
        length = int(torch.randint(5, max_length + 1, (1,), generator=generator))
        ids = torch.randint(4, VOCAB, (length,), generator=generator).tolist()
        mask = [1] * length
        if pad_to:
            ids, mask = ids + [PAD_ID] * (pad_to - length), mask + [0] * (pad_to - length)
        columns["input_ids"].append(ids)
        columns["attention_mask"].append(mask)
        columns["subject_positions"].append(int(torch.randint(1, length // 2, (1,), generator=generator)))
        columns["object_positions"].append(int(torch.randint(length // 2, length, (1,), generator=generator)))
        columns["labels"].append(ids[columns["subject_positions"][-1]] % 3)
    if segments:
        columns["token_type_ids"] = [[int(i >= len(ids) // 2) for i in range(len(ids))] for ids in columns["input_ids"]]
    return columns


def toy_dataset(**kwargs) -> Dataset:
    return Dataset.from_dict(toy_rows(**kwargs))


def pad_collate(features: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pad input_ids / attention_mask / token_type_ids, stack everything else."""
    width = max(len(f["input_ids"]) for f in features)
    batch: dict[str, torch.Tensor] = {}
    for key in features[0]:
        values = [torch.as_tensor(f[key]) for f in features]
        if key in ("input_ids", "attention_mask", "token_type_ids"):
            fill = PAD_ID if key == "input_ids" else 0
            batch[key] = torch.stack([torch.nn.functional.pad(v, (0, width - len(v)), value=fill) for v in values])
        else:
            batch[key] = torch.stack(values)
    return batch


def factual(base_dir: str, adapters: dict | None = None, seed: int = 0, **kwargs) -> hk.KAdapterForFactualPretraining:
    adapters = adapters or {"factual": tiny_adapter(**NO_DROPOUT)}
    return make_model(
        base_dir,
        hk.KAdapterForFactualPretraining,
        seed=seed,
        adapters=adapters,
        num_labels=3,
        classifier_dropout=0.0,
        **kwargs,
    )


class BaseCalls:
    """Counts the rows the base runs on; raises once `fail_after` forward calls have run (an interrupted build)."""

    def __init__(self, model, fail_after: int | None = None):
        self.rows = self.calls = 0
        self.fail_after = fail_after
        self.handle = model.kadapter.pretrained_model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        self.rows += kwargs["input_ids"].shape[0]

    def remove(self) -> None:
        self.handle.remove()


def build(model, data, path, **kwargs) -> FeatureCache:
    kwargs.setdefault("batch_size", 4)
    return build_feature_cache(model, data, path, progress=False, **kwargs)


# ----- exactness -----------------------------------------------------------------------------------------------
def test_cached_forward_equals_the_uncached_forward_on_a_padded_batch(base_dir, tmp_path):
    data = toy_dataset(segments="roberta" not in base_dir)  # BERT reads token_type_ids; RoBERTa has one type
    model = factual(base_dir)
    cache = build(model, data, tmp_path)
    assert cache.complete and len(cache) == len(data)
    assert cache.indices == cached_hidden_state_indices(model) == [0, 2, 3, 4]
    assert cache.lengths.tolist() == [len(ids) for ids in data["input_ids"]]

    features = [data.with_format(None)[i] for i in (3, 0, 7, 11)]  # mixed lengths: padded batch
    collator = CachedFeatureCollator(pad_collate, cache, model=model)
    plain = pad_collate(features)
    cached = collator(cache.attach(data).select([3, 0, 7, 11]).to_list())
    assert cached["attention_mask"].eq(0).any()
    for key, value in plain.items():
        assert torch.equal(cached[key], value), key
    states = cached["cached_hidden_states"]
    assert states.shape == (4, 4, plain["input_ids"].shape[1], 32)
    assert torch.all(states.masked_select(plain["attention_mask"][:, None, :, None] == 0) == 0)

    out = model(**plain)
    without_ids = {k: v for k, v in cached.items() if k != "input_ids"}  # the base is skipped: ids are not needed
    out_cached = model(**without_ids)
    assert torch.allclose(out_cached.logits, out.logits, atol=1e-6, rtol=1e-6)
    assert torch.allclose(out_cached.loss, out.loss, atol=1e-6, rtol=1e-6)

    core = model.kadapter  # the fused model too, at every real token
    real = plain["attention_mask"].bool()
    fused = core(
        **{k: v for k, v in plain.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    ).last_hidden_state
    fused_cached = core(attention_mask=plain["attention_mask"], cached_hidden_states=states).last_hidden_state
    assert torch.allclose(fused_cached[real], fused[real], atol=1e-6, rtol=1e-6)

    # What DataLoader workers receive (spawn pickles the collator) reopens the memory map instead of copying it.
    clone = pickle.loads(pickle.dumps(collator))
    assert clone.cache._states is None
    assert torch.equal(clone(cache.attach(data).select([3, 0, 7, 11]).to_list())["cached_hidden_states"], states)


def test_pretraining_head_caches_only_its_adapter_and_prepadded_rows_are_trimmed(base_dirs, tmp_path):
    adapters = {"factual": tiny_adapter(**NO_DROPOUT), "lexical": tiny_adapter(tap_layers=[1, 3], **NO_DROPOUT)}
    model = factual(base_dirs["roberta"], adapters=adapters, pretraining_adapter="lexical")
    assert model.kadapter.cached_hidden_state_indices() == [0, 1, 2, 3, 4]
    data = Dataset.from_dict(toy_rows(size=8, pad_to=12))  # padding="max_length"
    cache = build(model, data, tmp_path)
    assert cache.indices == [1, 3, 4]
    assert cache.lengths.tolist() == [sum(mask) for mask in data["attention_mask"]]  # no padding stored
    batch = CachedFeatureCollator(pad_collate, cache)(cache.attach(data).to_list())
    plain = pad_collate(data.to_list())
    assert batch["cached_hidden_states"].shape[2] == 12
    assert torch.allclose(model(**batch).logits, model(**plain).logits, atol=1e-6, rtol=1e-6)


# ----- the real Trainer path -----------------------------------------------------------------------------------
def _train(model, data, out, collator) -> Trainer:
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        max_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )  # remove_unused_columns keeps its default (True): the index column is named after a forward argument.
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator)
    trainer.train()
    return trainer


def test_trainer_from_the_cache_trains_the_same_adapter(base_dirs, tmp_path):
    base_dir = base_dirs["bert"]
    data = toy_dataset(size=20)
    plain = factual(base_dir)
    _train(plain, data, tmp_path / "plain", pad_collate)

    cached_model = factual(base_dir)
    cache = build(cached_model, data, tmp_path / "cache")
    calls = BaseCalls(cached_model)
    trainer = _train(
        cached_model,
        cache.attach(data),
        tmp_path / "cached",
        CachedFeatureCollator(pad_collate, cache, model=cached_model),
    )
    calls.remove()
    assert calls.calls == 0  # every step read the cache
    assert trainer.state.global_step == 5
    trained, initial = dict(cached_model.named_parameters()), factual(base_dir).state_dict()
    trainable = [name for name, value in plain.named_parameters() if value.requires_grad]
    assert trainable and all(not name.startswith("kadapter.pretrained_model.") for name in trainable)
    for name in trainable:
        # Identical, not merely close: the float32 cache holds the very states the base computes in training.
        assert torch.equal(trained[name], plain.get_parameter(name)), name
    assert any(not torch.equal(plain.get_parameter(name), initial[name]) for name in trainable)


def test_collator_needs_the_index_column(base_dirs, tmp_path):
    model = factual(base_dirs["bert"])
    data = toy_dataset(size=6)
    cache = build(model, data, tmp_path)
    with pytest.raises(KeyError, match="attach the dataset"):
        CachedFeatureCollator(pad_collate, cache)(data.to_list()[:2])
    with pytest.raises(ValueError, match="inputs differ"):
        cache.attach(toy_dataset(size=6, seed=1))
    # Non-HF datasets are wrapped; the index rides along with each row.
    wrapped = cache.attach(data.to_list())
    assert wrapped[4][CACHE_INDEX_COLUMN] == 4
    left_padded = [dict(f) for f in (wrapped[0], wrapped[1])]
    width = max(len(f["input_ids"]) for f in left_padded) + 1
    for feature in left_padded:
        extra = width - len(feature["input_ids"])
        feature["input_ids"] = [PAD_ID] * extra + feature["input_ids"]
        feature["attention_mask"] = [0] * extra + feature["attention_mask"]
    with pytest.raises(ValueError, match="pads on the left"):
        CachedFeatureCollator(pad_collate, cache)(left_padded)


# ----- keys ------------------------------------------------------------------------------------------------------
def test_key_changes_with_base_weights_tokenization_taps_and_dtype(base_dirs, tmp_path):
    data = toy_dataset(size=8)
    model = factual(base_dirs["bert"])
    key = feature_cache_key(model, data)
    cache = build(model, data, tmp_path)
    assert cache.key == key and cache.path.name == key

    torch.manual_seed(7)  # same shapes, other weights
    other = BertModel(BertConfig.from_pretrained(base_dirs["bert"]), add_pooling_layer=False)
    other_base = hk.KAdapterForFactualPretraining.from_base(
        other, adapters={"factual": tiny_adapter(**NO_DROPOUT)}, num_labels=3
    ).eval()
    retokenized = toy_rows(size=8)
    retokenized["input_ids"][5][2] += 1
    other_taps = factual(base_dirs["bert"], adapters={"factual": tiny_adapter(tap_layers=[0, 1, 3], **NO_DROPOUT)})
    with_types = toy_rows(size=8)
    with_types["token_type_ids"] = [[0] * len(ids) for ids in with_types["input_ids"]]
    keys = {
        "base weights": feature_cache_key(other_base, data),
        "tokenization": feature_cache_key(model, Dataset.from_dict(retokenized)),
        "token_type_ids": feature_cache_key(model, Dataset.from_dict(with_types)),
        "row order": feature_cache_key(model, data.select(list(reversed(range(8))))),
        "taps": feature_cache_key(other_taps, data),
        "dtype": feature_cache_key(model, data, dtype="float16"),
    }
    assert key not in keys.values() and len(set(keys.values())) == len(keys)

    # A stale cache is never reused: another base computes (and gets) its own states in another folder.
    calls = BaseCalls(other_base)
    fresh = build(other_base, data, tmp_path)
    calls.remove()
    assert calls.rows == len(data) and fresh.path != cache.path
    assert not torch.allclose(fresh[0], cache[0])
    with pytest.raises(ValueError, match="base_fingerprint"):
        cache.check_compatible(other_base)
    with pytest.raises(ValueError, match=r"holds hidden_states \[0, 2, 3, 4\], not \[1\]"):
        CachedFeatureCollator(pad_collate, cache, model=other_taps)

    # A finished cache is reused without running the base.
    calls = BaseCalls(model)
    again = build(model, data, tmp_path)
    calls.remove()
    assert calls.calls == 0 and again.path == cache.path


def test_a_cache_serves_every_model_reading_a_subset_of_its_states(base_dirs, tmp_path):
    """One cache built for a model with an adapter also feeds a head-only baseline and a downstream head on the
    same base: the collator hands each model exactly the hidden states it reads."""
    data = toy_dataset(size=8).remove_columns(["subject_positions", "object_positions", "labels"])
    with_adapter = factual(base_dirs["bert"])
    cache = build(with_adapter, data, tmp_path)
    torch.manual_seed(0)
    head_only = hk.KAdapterForSequenceClassification.from_base(base_dirs["bert"], adapters={}, num_labels=2).eval()
    assert cached_hidden_state_indices(head_only) == [4]
    collator = CachedFeatureCollator(pad_collate, cache, model=head_only)
    batch = collator([{**data[i], CACHE_INDEX_COLUMN: i} for i in range(4)])
    assert batch["cached_hidden_states"].shape[1] == 1
    cached = batch.pop("cached_hidden_states")
    with torch.no_grad():
        plain = head_only(**batch).logits
        from_cache = head_only(**batch, cached_hidden_states=cached).logits
    torch.testing.assert_close(from_cache, plain, rtol=1e-5, atol=1e-6)


# ----- resume ----------------------------------------------------------------------------------------------------
def test_an_interrupted_build_resumes_where_it_stopped(base_dirs, tmp_path):
    data = toy_dataset(size=22)
    model = factual(base_dirs["roberta"])
    straight = build(model, data, tmp_path / "straight", chunk_size=8)

    calls = BaseCalls(model, fail_after=3)  # chunks of 8 rows = 2 batches of 4: dies inside the second chunk
    with pytest.raises(KeyboardInterrupt):
        build(model, data, tmp_path / "resumed", chunk_size=8)
    calls.remove()
    folder = tmp_path / "resumed" / straight.key
    metadata = json.loads((folder / "metadata.json").read_text())
    assert metadata["completed_rows"] == 8 and not metadata["complete"]
    # no temp or staging files left behind (the build lock file stays: concurrent builders wait on it)
    assert [p for p in os.listdir(folder) if p.startswith(".")] == [BUILD_LOCK_NAME]
    with pytest.raises(RuntimeError, match="unfinished"):
        FeatureCache(folder)[0]

    calls = BaseCalls(model)
    resumed = build(model, data, tmp_path / "resumed", chunk_size=8)
    calls.remove()
    assert calls.rows == len(data) - 8  # finished rows were not recomputed
    assert resumed.complete
    assert np.array_equal(resumed.offsets, straight.offsets)
    assert np.array_equal(np.asarray(resumed.states), np.asarray(straight.states))


# ----- storage dtypes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_storage(base_dirs, tmp_path, dtype):
    data = toy_dataset(size=12)
    model = factual(base_dirs["bert"])
    full = build(model, data, tmp_path)
    half = build(model, data, tmp_path, dtype=dtype)
    assert half.path != full.path and half.dtype == dtype
    assert half[0].dtype == getattr(torch, dtype)
    states_bytes = {c: os.path.getsize(c.path / "hidden_states.npy") for c in (full, half)}
    assert states_bytes[half] < 0.51 * states_bytes[full]
    tolerance = 1e-2 if dtype == "float16" else 5e-2
    for row in range(len(data)):
        assert torch.allclose(half[row].float(), full[row], atol=tolerance, rtol=tolerance)
    rows = list(range(4))
    batch = CachedFeatureCollator(pad_collate, half)(half.attach(data).select(rows).to_list())
    plain = pad_collate(data.select(rows).to_list())
    assert torch.allclose(model(**batch).logits, model(**plain).logits, atol=5 * tolerance)


# ----- refusals -------------------------------------------------------------------------------------------------
def test_refuses_a_trainable_base(base_dirs, tmp_path):
    model = factual(base_dirs["bert"])
    model.unfreeze_base()
    with pytest.raises(ValueError, match="freeze_base"):
        build(model, toy_dataset(size=4), tmp_path)
    assert not list(tmp_path.iterdir())


# ----- several processes -----------------------------------------------------------------------------------------
def _distributed_worker(rank: int, base_dir: str, folder: str, results) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    try:
        model = factual(base_dir)
        calls = BaseCalls(model)
        cache = build(model, toy_dataset(size=10), os.path.join(folder, "cache"))
        results.put((rank, calls.rows, str(cache.path), cache.complete))
    finally:
        torch.distributed.destroy_process_group()


def test_under_torch_distributed_rank_zero_builds_and_the_others_open(base_dirs, tmp_path):
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    workers = [
        context.Process(target=_distributed_worker, args=(rank, base_dirs["bert"], str(tmp_path), results))
        for rank in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert [w.exitcode for w in workers] == [0, 0]
    outcome = dict((rank, rest) for rank, *rest in (results.get(timeout=5) for _ in workers))
    assert outcome[0][0] == 10 and outcome[1][0] == 0  # only rank 0 ran the base
    assert outcome[0][1:] == outcome[1][1:] and outcome[1][2]
