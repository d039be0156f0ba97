"""Interleaved documents: readers, the Flickr recipe (and its CLI), and LCL's records built
from them (vlpre/methods/lcl/data.py): packing into rows, exact resume."""
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from vlpre import data
from vlpre.data import documents
from vlpre.data import interleaved as I
from vlpre.methods.lcl import data as lcl_data

V = 49408  # CLIP BPE vocab: placeholder V, <soi> V + 1, <eoi> V + 2
PLACEHOLDER, SOI, EOI = V, V + 1, V + 2
EOT = V - 1
P = 4  # visual tokens per image: an image takes P + 2 = 6 tokens


@pytest.fixture(scope="module")
def clip_tok():
  return data.get_tokenizer("clip_bpe")


@pytest.fixture(scope="module")
def mmc4_docs(data_dir):
  with open(os.path.join(data_dir, "mmc4_fixture", "docs.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def flickr_docs(data_dir, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("flickr") / "val.jsonl")
  stats = I.build_flickr_interleaved(data_dir, path, pattern="flickr8k/val-*.tar")
  return path, stats


def take(it, n):
  return [next(it) for _ in range(n)]


def make_cfg(data_dir, **overrides):
  cfg = lcl_data.input_config(data_dir=data_dir, images="flickr8k/val-*.tar", image_size=16,
                       resize_size=18, context_len=64, max_images=3, visual_tokens=P,
                       prefetch_buffer_size=0)
  cfg.update(overrides)
  return cfg


def assert_same_batches(got, want):
  for g, w in zip(got, want, strict=True):
    assert set(g) == set(w)
    assert [list(k) for k in g["_key"]] == [list(k) for k in w["_key"]]
    for k in g:
      if k != "_key":
        np.testing.assert_array_equal(g[k], w[k], err_msg=k)


# ------------------------------------------------------------------------------ readers


def test_read_mmc4_places_images_before_their_sentence(mmc4_docs):
  assert len(mmc4_docs) == 107
  total_images = 0
  for doc in mmc4_docs:
    elements, unmatched = documents.read_mmc4(doc)
    assert unmatched == 0
    texts = [e[1] for e in elements if e[0] == I.TEXT]
    assert texts == doc["text_list"]
    # Each image is followed (after the other images of its group) by its sentence.
    for info in doc["image_info"]:
      key = info["image_name"].split(".")[0]
      at = next(i for i, e in enumerate(elements) if e[0] == I.IMAGE and e[1] == key)
      after = next(e for e in elements[at:] if e[0] == I.TEXT)
      assert after[1] == doc["text_list"][info["matched_text_index"]]
    # Images sharing a sentence keep their image_info order.
    keys = [e[1] for e in elements if e[0] == I.IMAGE]
    by_sentence = sorted(range(len(doc["image_info"])),
                         key=lambda i: (doc["image_info"][i]["matched_text_index"], i))
    assert keys == [doc["image_info"][i]["image_name"].split(".")[0] for i in by_sentence]
    total_images += len(keys)
  assert total_images == 417
  doc = dict(mmc4_docs[0], image_info=mmc4_docs[0]["image_info"] + [
      {"image_name": "x.jpg", "matched_text_index": 10_000}])
  assert documents.read_mmc4(doc)[1] == 1


def test_read_obelics_and_image_keys():
  doc = {"texts": ["Intro.", None, "After.", None],
         "images": [None, "http://e.com/a/cat.01.jpg?s=2", None, "k_1"]}
  assert documents.read_document(doc) == ([(I.TEXT, "Intro."), (I.IMAGE, "e.com/a/cat.01", None),
                                           (I.TEXT, "After."), (I.IMAGE, "k_1", None)], 0)
  assert documents.image_key("95d37b64235d.jpg") == "95d37b64235d"
  # Full keys: directories and inner dots stay, so these are three different images.
  assert [documents.image_key(n) for n in ("a/cat.jpg", "cat.v2.jpg", "cat.jpg")] == [
      "a/cat", "cat.v2", "cat"]
  with pytest.raises(ValueError, match="both"):
    documents.read_obelics({"texts": ["a"], "images": ["b"]})
  with pytest.raises(ValueError, match="2 texts but 1 images"):
    documents.read_obelics({"texts": ["a", None], "images": ["b"]})
  with pytest.raises(ValueError, match="layout"):
    documents.read_document({"text": "a"})


def test_flickr_recipe_is_deterministic(flickr_docs, data_dir, tmp_path):
  path, stats = flickr_docs
  assert stats["images"] == 1000
  again = tmp_path / "again.jsonl"
  assert I.build_flickr_interleaved(data_dir, str(again), pattern="flickr8k/val-*.tar") == stats
  assert again.read_bytes() == open(path, "rb").read()
  other = tmp_path / "other.jsonl"
  I.build_flickr_interleaved(data_dir, str(other), pattern="flickr8k/val-*.tar", seed=1)
  assert other.read_bytes() != again.read_bytes()

  source = data.TarShardSource("flickr8k/val-*.tar", data_dir=data_dir)
  captions = {r["__key__"]: json.loads(r["json"])["captions"]
              for r in (source[i] for i in range(len(source)))}
  with open(path, encoding="utf-8") as f:
    docs = [json.loads(line) for line in f]
  assert len(docs) == stats["documents"]
  keys = []
  for doc in docs:
    elements, _ = documents.read_document(doc)
    assert 2 <= len(elements) // 2 <= 4 or doc is docs[-1]
    for image, text in zip(elements[::2], elements[1::2]):  # image, then one of its captions
      assert image[0] == I.IMAGE and text[0] == I.TEXT and text[1] in captions[image[1]]
      keys.append(image[1])
  assert keys == sorted(captions)  # consecutive keys, each once
  sizes = np.bincount([len(d["images"]) // 2 for d in docs[:-1]])
  assert sizes[2] > 0 and sizes[3] > 0 and sizes[4] > 0


def test_paired_order_stats_and_determinism(data_dir):
  source = data.TarShardSource("flickr8k/val-*.tar", data_dir=data_dir)
  records = [source[i] for i in range(len(source))]

  def image_first(seed, epoch):
    wrap = I.WrapPair(seed, epoch_len=len(records))
    docs = [wrap.map_with_index(epoch * len(records) + i, r) for i, r in enumerate(records)]
    assert all(len(d["elements"]) == 2 for d in docs)
    return np.array([d["elements"][0][0] == I.IMAGE for d in docs])

  first = image_first(0, 0)
  assert 0.45 < first.mean() < 0.55
  np.testing.assert_array_equal(first, image_first(0, 0))
  assert 0.3 < (first != image_first(1, 0)).mean() < 0.7  # other seed: other orders
  assert 0.3 < (first != image_first(0, 1)).mean() < 0.7  # next epoch: redrawn
  doc = I.WrapPair(0, len(records)).map_with_index(0, records[0])
  text = next(e[1] for e in doc["elements"] if e[0] == I.TEXT)
  assert text in json.loads(records[0]["json"])["captions"]


# ------------------------------------------------------------------- tokens and pieces


def test_tokenize_and_split_at_element_boundaries(clip_tok):
  long_text = " ".join(f"word{i}" for i in range(60))  # far more than L tokens
  record = {"__key__": "d", "_num_dropped_images": 0, "images": np.zeros((5, 2, 2, 3), np.float32),
            "elements": [(I.IMAGE, 0), (I.TEXT, "A dog."), (I.TEXT, "  "), (I.IMAGE, 1),
                         (I.TEXT, long_text), (I.IMAGE, 2), (I.IMAGE, 3), (I.IMAGE, 4),
                         (I.TEXT, "The end.")]}
  L, M = 24, 2
  doc = lcl_data.TokenizeDocument(clip_tok, context_len=L, visual_tokens=P,
                           image_token_ids=(PLACEHOLDER, SOI, EOI)).map(record)
  tokens, starts = doc["tokens"], doc["element_starts"]
  assert tokens[-1] == EOT and doc["is_text"][-1]  # the end token; no start token
  assert (np.diff(starts) <= L).all()  # the long text is cut into chunks of at most L
  image_starts = starts[:-1][doc["element_is_image"]]
  assert len(image_starts) == 5
  for s in image_starts:
    assert list(tokens[s:s + P + 2]) == [SOI] + [PLACEHOLDER] * P + [EOI]
  np.testing.assert_array_equal(doc["is_text"], tokens < V)

  pieces = lcl_data.SplitDocument(L, M).flat_map({**doc, "_num_bad": 3})
  assert np.concatenate([p["tokens"] for p in pieces]).tolist() == tokens.tolist()
  assert [p["__key__"] for p in pieces] == [f"d#{i}" for i in range(len(pieces))]
  assert [p["_num_bad"] for p in pieces] == [3] + [0] * (len(pieces) - 1)
  offset, seen_images = 0, 0
  for piece in pieces:
    n = len(piece["tokens"])
    assert n <= L and len(piece["images"]) <= M and offset in starts  # cut at a boundary
    np.testing.assert_array_equal(piece["tokens"][piece["soi_offsets"]], SOI)
    assert len(piece["soi_offsets"]) == len(piece["images"]) == (piece["tokens"] == SOI).sum()
    np.testing.assert_array_equal(piece["image_valid"], piece["soi_offsets"] > 0)
    np.testing.assert_array_equal(piece["target_mask"], np.append(piece["tokens"][1:] < V, 0))
    seen_images += len(piece["images"])
    offset += n
  assert seen_images == 5
  assert not pieces[0]["image_valid"][0]  # the document opens with an image


def test_llm_tokenizer_spaces_and_eos():
  from vlpre.llm import TextTokenizer, assets, checkpoints  # pylint: disable=g-import-not-at-top
  path, asset = assets.resolve("smollm2-135m")
  backend = checkpoints.GGUFCheckpoint(path).tokenizer()
  eos = backend.token_to_id(asset.eos_token)
  tok = TextTokenizer(backend, pad_id=eos, eos_id=eos)
  record = {"__key__": "d", "_num_dropped_images": 0, "images": np.zeros((1, 2, 2, 3), np.float32),
            "elements": [(I.TEXT, "hello"), (I.TEXT, "world"), (I.IMAGE, 0), (I.TEXT, "world")]}
  doc = lcl_data.TokenizeDocument(tok, context_len=32, visual_tokens=P,
                           image_token_ids=lcl_data.image_token_ids({}, tok)).map(record)
  encode = lambda text: backend.encode(text, add_special_tokens=False).ids
  world, space_world = encode("world"), encode(" world")
  assert space_world != world
  ids = doc["tokens"].tolist()
  assert ids == (encode("hello") + space_world
                 + [49153] + [49152] * P + [49154] + world + [eos])


# -------------------------------------------------------------------------- packed rows


def check_row(row, L, M):
  """Row invariants, each re-derived naively from tokens and segment ids."""
  tokens, seg, pos = row["tokens"], row["segment_ids"], row["positions"]
  used = int((seg > 0).sum())
  assert (seg[used:] == 0).all() and (tokens[used:] == 0).all()
  assert (np.diff(seg[:used]) >= 0).all() and (used == 0 or seg[0] == 1)
  for s in range(1, int(seg.max()) + 1):
    np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))
  want_target = np.zeros(L, np.int32)
  want_target[:-1] = (seg[:-1] > 0) & (seg[1:] == seg[:-1]) & (tokens[1:] < V)
  np.testing.assert_array_equal(row["target_mask"], want_target)
  present = row["image_present"]
  n = int(present.sum())
  assert n <= M and present[:n].all() and not present[n:].any()
  assert n == (tokens == SOI).sum() == (tokens == EOI).sum() == (tokens == PLACEHOLDER).sum() // P
  soi = row["soi_positions"][:n]
  np.testing.assert_array_equal(soi, np.flatnonzero(tokens == SOI))
  for m, s in enumerate(soi):  # intact: <soi>, P placeholders, <eoi>, one segment
    np.testing.assert_array_equal(row["visual_positions"][m], s + 1 + np.arange(P))
    assert list(tokens[s:s + P + 2]) == [SOI] + [PLACEHOLDER] * P + [EOI]
    assert len(set(seg[s:s + P + 2])) == 1
  np.testing.assert_array_equal(row["image_valid"], present & (pos[row["soi_positions"]] > 0))
  assert (row["visual_positions"][n:] == L).all() and (row["images"][n:] == 0).all()
  assert (row["soi_positions"][n:] == 0).all()


def rows_of(batches):
  for batch in batches:
    for b in range(len(batch["tokens"])):
      yield {k: (v[b] if k not in ("_num_bad", "_num_dropped_images") else v)
             for k, v in batch.items()}


def test_packed_rows_rebuild_the_documents(flickr_docs, data_dir, clip_tok):
  cfg = make_cfg(data_dir, documents=flickr_docs[0])
  L, M = cfg.context_len, cfg.max_images
  ds = data.build_train_dataset(cfg, global_batch_size=4, seed=0, tokenizer=clip_tok,
                                records=lcl_data.train_records)
  batches = take(iter(ds), 6)
  assert batches[0]["tokens"].shape == (4, L) and batches[0]["images"].shape == (4, M, 16, 16, 3)
  assert batches[0]["visual_positions"].shape == (4, M, P)
  assert batches[0]["image_valid"].dtype == bool and batches[0]["tokens"].dtype == np.int32
  pieces = {}  # piece key -> (tokens, images) cut from the rows
  rows = list(rows_of(batches))
  valid = np.concatenate([r["image_valid"][r["image_present"]] for r in rows])
  assert valid.any() and not valid.all()  # a recipe document opens with an image
  assert max(r["image_present"].sum() for r in rows) == M
  for row in rows:
    check_row(row, L, M)
    seg, keys = row["segment_ids"], row["_key"]
    assert int(seg.max()) == len(keys)
    for s, key in enumerate(keys, start=1):
      in_row = row["image_present"] & (seg[row["soi_positions"]] == s)
      pieces[key] = (row["tokens"][seg == s], row["images"][in_row])
  # The same documents, straight from the record stream (same seed: same crops).
  records, _ = lcl_data.train_records(cfg, seed=0, tokenizer=clip_tok, host_batch=4)
  complete = 0
  for i in range(40):
    doc = records[i]
    parts = [pieces[k] for k in (f"{doc['__key__']}#{j}" for j in range(10)) if k in pieces]
    tokens = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0)
    if len(tokens) < len(doc["tokens"]):
      continue  # some piece is in a later batch
    complete += 1
    np.testing.assert_array_equal(tokens, doc["tokens"])
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), doc["images"])
  assert complete >= 5 and any(k.endswith("#1") for k in pieces)  # some split in pieces


def test_exact_resume_with_paired_mix(flickr_docs, data_dir, clip_tok):
  cfg = make_cfg(data_dir, documents=flickr_docs[0], paired="flickr8k/val-*.tar", mix=0.5,
                 prefetch_buffer_size=2, max_images=2, context_len=32)
  ds = data.build_train_dataset(cfg, global_batch_size=4, seed=7, tokenizer=clip_tok,
                                records=lcl_data.train_records)
  it = iter(ds)
  first = take(it, 3)
  keys = [k for b in first for row in b["_key"] for k in row]
  assert any(":" not in k for k in keys) and any(":" in k for k in keys)  # pairs and documents
  for row in rows_of(first):
    check_row(row, 32, 2)
  state = it.get_state()
  json.dumps(state)
  want = take(it, 3)
  fresh = iter(ds)
  fresh.set_state(state)
  assert_same_batches(take(fresh, 3), want)
  it.set_state(state)
  assert_same_batches(take(it, 3), want)
  # Pickles (what mp_prefetch does with it) and gives the same batches after.
  assert_same_batches(take(iter(pickle.loads(pickle.dumps(ds))), 3), first)


# ------------------------------------------------------------------- missing / bad images


def _jpeg(seed):
  buf = io.BytesIO()
  pixels = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), np.uint8)
  Image.fromarray(pixels).save(buf, "JPEG")
  return buf.getvalue()


def test_missing_and_bad_images_are_dropped_and_counted(mmc4_docs, tmp_path, clip_tok):
  docs = mmc4_docs[:30]
  names = sorted({i["image_name"].split(".")[0] for d in docs for i in d["image_info"]})
  have = names[::2]  # every other image exists; the first one is corrupt
  with tarfile.open(tmp_path / "images-00000.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
    for n, key in enumerate(have):
      payload = b"\xff\xd8 not a jpeg" if n == 0 else _jpeg(n)
      info = tarfile.TarInfo(f"{key}.jpg")
      info.size = len(payload)
      tf.addfile(info, io.BytesIO(payload))
  good = set(have[1:])
  with open(tmp_path / "docs.jsonl", "w", encoding="utf-8") as f:
    for doc in docs:
      f.write(json.dumps(doc) + "\n")
    f.write("{broken\n")  # a bad document
    f.write(json.dumps({"texts": [None], "images": ["gone.jpg"]}) + "\n")  # nothing left: bad
  dropped = {f"docs:{i}": sum(i["image_name"].split(".")[0] not in good for i in d["image_info"])
             for i, d in enumerate(docs)}
  assert 0 < sum(dropped.values()) < sum(len(d["image_info"]) for d in docs)
  cfg = make_cfg(None, documents=str(tmp_path / "docs.jsonl"), images=str(tmp_path / "*.tar"),
                 shuffle=False, context_len=48, max_images=2)
  # Rows before batching: each document's count rides on its first piece.
  records, stream = lcl_data.train_records(cfg, seed=0, tokenizer=clip_tok, host_batch=4)
  rows = iter(stream(data.SkipBad(records.to_iter_dataset())))
  counts = {}
  while len(counts) < len(docs):
    row = next(rows)
    check_row(row, 48, 2)
    for key, n in zip(row["__key__"], row["_num_dropped_images"]):
      if key.endswith("#0"):
        counts[key[:-2]] = n
  assert counts == dropped
  # Batches: the counts summed; the two broken documents in _num_bad (on the next good
  # document, the second epoch's first).
  it = iter(data.build_train_dataset(cfg, global_batch_size=4, seed=0, tokenizer=clip_tok,
                                     records=lcl_data.train_records))
  num_bad, num_dropped, firsts = 0, 0, 0
  while firsts < 2:
    batch = next(it)
    num_bad += batch["_num_bad"]
    num_dropped += batch["_num_dropped_images"]
    firsts += sum(k == "docs:0#0" for row in batch["_key"] for k in row)
  assert num_bad == 2 and num_dropped >= sum(dropped.values())


def _convert_interleaved(data_dir, out_dir, *extra):
  return subprocess.run(
      [sys.executable, "-m", "vlpre.data.convert", "--mode=interleaved",
       "--pairs=flickr8k/val-*.tar", f"--data_dir={data_dir}", f"--out_dir={out_dir}",
       "--split=val", *extra],
      capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120,
      cwd=os.path.dirname(os.path.dirname(__file__)))


@pytest.mark.integration
def test_convert_cli_writes_the_recipe(flickr_docs, data_dir, tmp_path):
  result = _convert_interleaved(data_dir, tmp_path)
  assert result.returncode == 0, result.stderr
  path, stats = flickr_docs
  assert f"wrote {stats['documents']} documents of 1000 images" in result.stdout
  assert (tmp_path / "val.jsonl").read_bytes() == open(path, "rb").read()


@pytest.mark.integration
def test_convert_cli_skip_existing_leaves_the_file(data_dir, tmp_path):
  out = tmp_path / "val.jsonl"
  out.write_text("kept\n")
  result = _convert_interleaved(data_dir, tmp_path, "--skip_existing")
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == [f"{out} exists; skipping (--skip_existing)"]
  assert out.read_text() == "kept\n"
