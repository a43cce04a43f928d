"""tasks.pretrain.data / tasks.pretrain.task: items, masks, negatives, QA targets, determinism, bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from region_labels import random_labels
from torch.utils.data import DataLoader

from common.config import load_config
from extract.store import FeatureWriter
from model import LxmertTokenizer
from tasks.config import TrainConfig
from tasks.data.answer_table import load_answer_table
from tasks.data.regions import MissingImagesError
from tasks.pretrain.corpus import PretrainDataError, build_corpus, read_pretrain_json
from tasks.pretrain.data import IGNORE, MaskingOptions, mask_tokens
from tasks.pretrain.task import build

ROOT = Path(__file__).resolve().parents[2]
DIM = 8
ANSWERS = ["yes", "no", "2", "cat", "dog", "red", "man", "gray"]
SENTENCES = [
    "a cat sitting on a red mat next to the window",
    "two dogs are playing with a frisbee in the park",
    "a man riding a bicycle down a busy city street",
]


def write_store(path: Path, ids: list[str], n: int = 6, extractor: dict | None = None) -> None:
    rng = np.random.default_rng(len(ids))
    with FeatureWriter(path, extractor=extractor or {"source": "tsv", "file": "x.tsv"}) as writer:
        for img_id in ids:
            writer.put(
                img_id,
                {
                    "features": rng.normal(1.0, 1.0, (n, DIM)).astype(np.float32),
                    "boxes": np.tile(np.array([[10, 20, 60, 80]], np.float32), (n, 1)),
                    **random_labels(rng, n, conf_low=0.1),
                    "img_h": 100,
                    "img_w": 200,
                },
            )


def entries(ids: list[str]) -> list[dict]:
    return [
        {
            "img_id": img_id,
            "sentf": {"mscoco": SENTENCES[: 1 + k % 3], "vqa": ["what is on the mat?", "how many dogs?"]},
            "labelf": {"vqa": [{"The Cat.": 0.9, "dog": 0.3}, {"two": 1.0, "unknown answer": 1.0}]},
        }
        for k, img_id in enumerate(ids)
    ]


@pytest.fixture
def pretrain_files(tmp_path: Path) -> dict[str, Path]:
    ids = [f"img{i}" for i in range(8)]
    write_store(tmp_path / "coco.lmdb", ids[:5])
    write_store(tmp_path / "vg.lmdb", ids[5:])
    (tmp_path / "train.json").write_text(json.dumps(entries(ids)))
    (tmp_path / "valid.json").write_text(json.dumps(entries(ids[:4])))
    (tmp_path / "answers.json").write_text(json.dumps([{"ans": a, "dsets": ["vqa"]} for a in ANSWERS]))
    return {
        k: tmp_path / f
        for k, f in [("train", "train.json"), ("valid", "valid.json"), ("answers", "answers.json")]
    }


def make_config(files: dict[str, Path], *overrides: str) -> TrainConfig:
    tmp = files["train"].parent
    return load_config(
        TrainConfig,
        ROOT / "tasks" / "configs" / "pretrain_tiny.yaml",
        [
            f"data.train=[{files['train']}]",
            f"data.valid={files['valid']}",
            f"data.features=[{tmp / 'coco.lmdb'},{tmp / 'vg.lmdb'}]",
            f"data.answers={files['answers']}",
            f"model.visual_feat_dim={DIM}",
            *overrides,
        ],
    )


# ------------------------------------------------------------------------------------------------ items
def test_flattening_uids_and_labels(pretrain_files):
    corpus = build_corpus([pretrain_files["train"]], ANSWERS)
    # per image: 1..3 captions + 2 questions, items of one image kept together
    assert len(corpus) == sum(1 + k % 3 + 2 for k in range(8))
    assert (
        corpus.uid(0) == "img0_mscoco_000"
        and corpus.uid(1) == "img0_vqa_000"
        and corpus.uid(2) == "img0_vqa_001"
    )
    assert corpus.sentence(1) == "what is on the mat?"
    # labels normalised ("The Cat." -> cat, "two" -> 2) and pruned to the table ("unknown answer" dropped)
    answers, scores = corpus.label(1)
    assert [ANSWERS[a] for a in answers] == ["cat", "dog"] and scores.tolist() == pytest.approx([0.9, 0.3])
    answers, scores = corpus.label(2)
    assert [ANSWERS[a] for a in answers] == ["2"] and scores.tolist() == [1.0]
    assert len(corpus.label(0)[0]) == 0  # captions have no label
    assert corpus.image_start.tolist()[:3] == [0, 3, 7]
    sub = corpus.without_images({"img0", "img3"})
    assert sub.num_images == 6 and sub.uid(0) == "img1_mscoco_000" and sub.label(3)[1].tolist() == [1.0]
    assert build_corpus([pretrain_files["train"]], ANSWERS, limit=2).num_images == 2


def test_an_image_in_two_files_keeps_its_items_together(tmp_path: Path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(entries(["x", "y"])))
    second.write_text(
        json.dumps([{"img_id": "x", "sentf": {"vg": ["a dog"]}, "labelf": {"vg": [{"yes": 1}]}}])
    )
    corpus = build_corpus([first, second], ANSWERS)
    assert corpus.img_ids == ["x", "y"] and corpus.image_start.tolist() == [0, 4, 8]
    assert [corpus.uid(i) for i in range(4)] == ["x_mscoco_000", "x_vqa_000", "x_vqa_001", "x_vg_000"]
    assert corpus.sentence(3) == "a dog" and corpus.label(3)[0].tolist() == [0]
    assert corpus.sentence(4) == SENTENCES[0] and corpus.uid(7) == "y_vqa_001"
    assert [ANSWERS[a] for a in corpus.label(6)[0]] == ["cat", "dog"] and len(corpus.label(5)[0]) == 0


def test_later_duplicate_answer_overwrites(tmp_path: Path):
    path = tmp_path / "d.json"
    path.write_text(
        json.dumps([{"img_id": "a", "sentf": {"vqa": ["q"]}, "labelf": {"vqa": [{"Two": 0.3, "2": 0.9}]}}])
    )
    corpus = build_corpus([path], ANSWERS)
    assert corpus.label(0)[1].tolist() == pytest.approx([0.9])


def test_answer_normalisation_and_qa_sets_on_real_table(shared_data: Path, tmp_path: Path):
    table_path = shared_data / "lxmert_answers" / "all_ans.json"
    if not table_path.is_file():
        pytest.skip(f"{table_path} is missing")
    full = load_answer_table(table_path)
    vqa = load_answer_table(table_path, ["vqa"])
    assert len(full) == 9500 and len(vqa) == 3124
    only_visual7w = next(a["ans"] for a in json.loads(table_path.read_text()) if a["dsets"] == ["visual7w"])
    label = {"Two.": 0.6, "The Grey": 1.0, "an apple": 0.3, only_visual7w: 1.0, "not an answer at all": 1.0}
    path = tmp_path / "q.json"
    path.write_text(json.dumps([{"img_id": "a", "sentf": {"vqa": ["q"]}, "labelf": {"vqa": [label]}}]))
    for table, kept in ((full, {"2", "gray", "apple", only_visual7w}), (vqa, {"2", "gray", "apple"})):
        answers, _ = build_corpus([path], table).label(0)
        assert {table[a] for a in answers} == kept


# ------------------------------------------------------------------------------------------------ masking
def test_token_masking_statistics():
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, 200_000)
    out, labels = mask_tokens(ids, rng, 0.15, mask_id=103, vocab_size=30522)
    chosen = labels != IGNORE
    assert chosen.mean() == pytest.approx(0.15, abs=0.003)
    np.testing.assert_array_equal(labels[chosen], ids[chosen])
    assert np.all(out[~chosen] == ids[~chosen])
    masked, kept = out[chosen] == 103, out[chosen] == ids[chosen]
    swapped = ~masked & ~kept
    assert masked.mean() == pytest.approx(0.8, abs=0.01)
    assert kept.mean() == pytest.approx(0.1, abs=0.006)
    assert swapped.mean() == pytest.approx(0.1, abs=0.006)
    # random tokens uniform over the whole vocabulary (special and unused entries included)
    assert out[chosen][swapped].min() < 1000 and out[chosen][swapped].max() > 30000


def test_masking_options_come_from_the_config():
    """The draws' settings are the config's (defaults live in tasks.config only)."""
    assert MaskingOptions.from_config(TrainConfig()) == MaskingOptions(
        max_seq_length=20,
        mlm=True,
        word_mask_rate=0.15,
        visual=True,
        obj_mask_rate=0.15,
        matched=True,
        qa=True,
    )
    config = load_config(
        TrainConfig,
        None,
        [
            "data.max_seq_length=12",
            "pretrain.word_mask_rate=0.3",
            "pretrain.visual_losses=[]",
            "pretrain.qa=false",
        ],
    )
    options = MaskingOptions.from_config(config)
    assert (options.max_seq_length, options.word_mask_rate, options.visual, options.qa) == (
        12,
        0.3,
        True,  # regions are masked without visual losses too, as the original
        False,
    )
    restored = load_config(TrainConfig, None, ["pretrain.visual_losses=[]", "pretrain.mask_inputs=with_loss"])
    assert MaskingOptions.from_config(restored).visual is False


@pytest.mark.parametrize("mask_inputs", ["always", "with_loss"])
def test_ablations_mask_the_inputs_as_the_original(pretrain_files, mask_inputs):
    """With the masked-LM and every visual loss off, words and regions are still corrupted at the original's
    rates (pretrain.mask_inputs: always, the default); with_loss leaves them clean. Only matching is trained."""
    config = make_config(
        pretrain_files, "pretrain.mlm=false", "pretrain.visual_losses=[]", "pretrain.qa=false",
        f"pretrain.mask_inputs={mask_inputs}",
    )  # fmt: skip
    task = build(config)
    ds = task.train_dataset()
    tok = LxmertTokenizer()
    index = {ds.corpus.uid(i): i for i in range(len(ds))}
    n_tokens = n_chosen = n_mask_token = n_regions = n_region_masked = n_zero = 0
    for epoch in range(30):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            length = int(item["attention_mask"].sum())
            clean = tok.convert_tokens_to_ids(
                tok.tokenize(ds.corpus.sentence(index[item["sentence_uid"]]))[: 20 - 2]
            )
            ids = item["input_ids"][1 : length - 1]
            assert len(ids) == len(clean)
            chosen = item["mlm_labels"][1 : length - 1] != IGNORE
            assert np.array_equal(ids[~chosen], np.asarray(clean)[~chosen])  # only chosen pieces change
            n_tokens += len(ids)
            n_chosen += int(chosen.sum())
            n_mask_token += int((ids[chosen] == tok.mask_token_id).sum())
            mask = item["feat_mask"] > 0
            n_regions += len(mask)
            n_region_masked += int(mask.sum())
            n_zero += int((np.abs(item["masked_feats"][mask]).sum(1) == 0).sum())
            assert np.array_equal(item["masked_feats"][~mask], item["regions"].features[~mask])
    if mask_inputs == "with_loss":
        assert n_chosen == n_region_masked == 0
    else:
        assert n_chosen / n_tokens == pytest.approx(0.15, abs=0.015)
        assert n_mask_token / n_chosen == pytest.approx(0.8, abs=0.04)
        assert n_region_masked / n_regions == pytest.approx(0.15, abs=0.015)
        assert n_zero / n_region_masked == pytest.approx(0.8, abs=0.05)
    # the losses are the enabled ones only: masks corrupt the inputs, they add no objective
    batch = task.collate([ds[i] for i in range(8)])
    out = task.step(task.build_model(None), batch, 0)
    assert set(out.parts) == {"matched"}


def test_dataset_draw_statistics(pretrain_files):
    task = build(make_config(pretrain_files))
    ds = task.train_dataset()
    tok = LxmertTokenizer()
    n_tokens = n_masked = n_regions = n_region_masked = n_zero = n_same = matched = qa = cat = 0
    for epoch in range(40):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            length = int(item["attention_mask"].sum())
            assert (
                item["input_ids"][0] == tok.cls_token_id and item["input_ids"][length - 1] == tok.sep_token_id
            )
            assert item["mlm_labels"][0] == IGNORE and np.all(item["mlm_labels"][length - 1 :] == IGNORE)
            n_tokens += length - 2
            n_masked += int((item["mlm_labels"] != IGNORE).sum())
            mask = item["feat_mask"] > 0
            orig = item["regions"].features
            n_regions += len(mask)
            n_region_masked += int(mask.sum())
            n_zero += int((np.abs(item["masked_feats"][mask]).sum(1) == 0).sum())
            n_same += int((item["masked_feats"][mask] == orig[mask]).all(1).sum())
            assert np.array_equal(item["masked_feats"][~mask], orig[~mask])
            matched += item["matched_label"]
            if item["matched_label"] == 0:
                assert (
                    item["sentence_uid"].split("_")[0] != item["uid"].split("_")[0]
                )  # another image's sentence
                assert item["qa_target"] == IGNORE
            if item["uid"].endswith("vqa_000") and item["matched_label"] == 1:
                qa += 1
                cat += ANSWERS[item["qa_target"]] == "cat"
    assert n_masked / n_tokens == pytest.approx(0.15, abs=0.015)
    assert n_region_masked / n_regions == pytest.approx(0.15, abs=0.015)
    assert n_zero / n_region_masked == pytest.approx(0.8, abs=0.04)
    assert n_same / n_region_masked == pytest.approx(0.1, abs=0.03)  # kept; the other 10% from another region
    assert matched / (40 * len(ds)) == pytest.approx(0.5, abs=0.045)
    assert cat / qa == pytest.approx(0.9 / 1.2, abs=0.1)  # target drawn in proportion to the scores


def test_draws_depend_on_seed_epoch_index_only(pretrain_files):
    task = build(make_config(pretrain_files))
    ds = task.train_dataset()

    def draw(epoch: int, index: int) -> dict:
        ds.set_epoch(epoch)
        return ds[index]

    def same(a: dict, b: dict) -> bool:
        keys = (
            "input_ids",
            "mlm_labels",
            "masked_feats",
            "feat_mask",
            "matched_label",
            "qa_target",
            "sentence_uid",
        )
        return all(np.array_equal(a[k], b[k]) for k in keys)

    first = [draw(3, i) for i in range(len(ds))]
    _ = draw(5, 7)  # other draws in between change nothing
    assert all(same(first[i], draw(3, i)) for i in range(len(ds)))
    assert sum(same(first[i], draw(4, i)) for i in range(len(ds))) < len(ds) // 4
    # validation: the same draws every time, whatever the epoch
    valid = task.valid_dataset()
    a = valid[2]
    valid.set_epoch(9)
    assert same(a, valid[2])
    # workers do not change the batches
    ds.set_epoch(2)
    loaders = [
        DataLoader(
            ds,
            batch_size=8,
            collate_fn=task.collate,
            num_workers=w,
            multiprocessing_context="fork" if w else None,
        )
        for w in (0, 2)
    ]
    for b0, b2 in zip(*loaders):
        for key in ("input_ids", "mlm_labels", "visual_feats", "feat_target", "matched_label", "qa_target"):
            assert torch.equal(b0[key], b2[key])


def test_collate_shapes_and_padding(pretrain_files, tmp_path: Path):
    write_store(tmp_path / "small.lmdb", ["s0", "s1"], n=3)
    (tmp_path / "s.json").write_text(json.dumps(entries(["s0", "s1"])))
    cfg = make_config(
        pretrain_files,
        f"data.train=[{pretrain_files['train']},{tmp_path / 's.json'}]",
        f"data.features=[{tmp_path / 'coco.lmdb'},{tmp_path / 'vg.lmdb'},{tmp_path / 'small.lmdb'}]",
    )
    task = build(cfg)
    ds = task.train_dataset()
    last = len(ds) - 1  # an item of s1 (3 regions)
    batch = task.collate([ds[0], ds[last]])
    assert batch["input_ids"].shape == (2, 20) and batch["visual_feats"].shape == (2, 6, DIM)
    assert batch["visual_attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    assert batch["obj_ids"][1, 3:].tolist() == [IGNORE] * 3 and batch["obj_conf"][1, 3:].sum() == 0
    assert batch["feat_mask"][1, 3:].sum() == 0
    assert batch["uid"][1].startswith("s1_")


# ------------------------------------------------------------------------------------------------ bad input
def test_malformed_json_names_path_and_entry(tmp_path: Path):
    path = tmp_path / "bad.json"
    path.write_text('[{"img_id": "a", "sentf": {"x": ["s"]}}, ')
    with pytest.raises(
        PretrainDataError, match=r"bad.json:1:\d+: pretraining JSON file .* is not valid JSON"
    ):
        read_pretrain_json(path)
    good = {"img_id": "a", "sentf": {"mscoco": ["s"]}}
    cases = [
        ({"img_id": "b", "sentf": ["s"]}, r"entry 1 \(img_id 'b'\): 'sentf'"),
        ({"img_id": 3, "sentf": {}}, r"entry 1 \(img_id 3\): 'img_id' is missing"),
        (
            {"img_id": "c", "sentf": {"vqa": ["q", "r"]}, "labelf": {"vqa": [{"a": 1}]}},
            r"entry 1.*one label per",
        ),
        (
            {"img_id": "d", "sentf": {"vqa": ["q"]}, "labelf": {"vqa": [{"a": "x"}]}},
            r"entry 1.*answer: score",
        ),
        ({"img_id": "e", "sentf": {"vqa": [1]}}, r"entry 1.*sentf\['vqa'\] is not a list of strings"),
    ]
    for bad, pattern in cases:
        path.write_text(json.dumps([good, bad, bad]))
        with pytest.raises(PretrainDataError, match=pattern) as err:
            read_pretrain_json(path)
        assert str(path) in str(err.value)
    path.write_text(json.dumps({"img_id": "a"}))
    with pytest.raises(PretrainDataError, match="not a list"):
        read_pretrain_json(path)
    with pytest.raises(PretrainDataError, match=r"pretraining JSON file .*absent\.json does not exist"):
        read_pretrain_json(tmp_path / "absent.json")


def test_empty_dataset_is_an_error(pretrain_files, tmp_path: Path):
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(PretrainDataError, match="empty.json: the pretraining data set is empty"):
        build(make_config(pretrain_files, f"data.train=[{tmp_path / 'empty.json'}]"))


def test_missing_images_reported(pretrain_files, tmp_path: Path, caplog):
    (tmp_path / "more.json").write_text(json.dumps(entries(["img1", "ghost1", "ghost2"])))
    train = f"data.train=[{pretrain_files['train']},{tmp_path / 'more.json'}]"
    with pytest.raises(
        MissingImagesError, match=r"2 of 10 images of .*more.json \(9 sentences\).*'ghost1', 'ghost2'"
    ):
        build(make_config(pretrain_files, train))
    with caplog.at_level(logging.WARNING, logger="tasks.data.regions"):
        task = build(make_config(pretrain_files, train, "data.allow_missing_images=true"))
    assert "2 of 10 images" in caplog.text and "dropped" in caplog.text
    assert task.train_corpus.num_images == 8 and "ghost1" not in task.train_corpus.img_ids
