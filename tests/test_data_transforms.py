"""Typed grain transforms: decoding, caption/label parsing, geometry, bad-record handling."""
import io
import json
import pickle

import grain
import numpy as np
import pytest
from PIL import Image

from vlpre.data import sources
from vlpre.data import tokenizers
from vlpre.data import transforms as T


def _png(h=20, w=30, seed=0, mode="RGB"):
  rng = np.random.default_rng(seed)
  shape = (h, w, 3) if mode == "RGB" else (h, w, 4) if mode == "RGBA" else (h, w)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, format="PNG")
  return buf.getvalue()


def _jpg(h=20, w=30):
  buf = io.BytesIO()
  Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(buf, format="JPEG")
  return buf.getvalue()


def _rng(seed=0):
  return np.random.default_rng(seed)


def test_decode_image_formats_and_modes():
  out = T.DecodeImage().map({"__key__": "a", "png": _png(mode="RGBA"), "json": b"{}"})
  assert out["image"].shape == (20, 30, 3) and out["image"].dtype == np.uint8
  assert "png" not in out and out["json"] == b"{}"  # encoded bytes dropped, others kept
  gray = T.DecodeImage().map({"__key__": "g", "jpg": _png(mode="L")})  # wrong ext is fine
  assert gray["image"].shape == (20, 30, 3)
  assert T.DecodeImage(keys=("img",)).map({"img": _jpg()})["image"].shape == (20, 30, 3)


@pytest.mark.parametrize("record,reason", [
    ({"__key__": "x", "jpg": b"not an image"}, "cannot decode"),
    ({"__key__": "x", "jpg": _jpg()[:200]}, "cannot decode"),  # truncated JPEG
    ({"__key__": "x", "json": b"{}"}, "no image member"),
])
def test_decode_image_marks_bad(record, reason):
  out = T.DecodeImage().map(record)
  assert reason in out["_bad"] and "'x'" in out["_bad"]
  assert "_bad" not in record  # input not mutated


def test_parse_caption_modes():
  rec = {"__key__": "k", "json": json.dumps({"captions": ["  first ", "", "second", "   "]}).encode()}
  first = T.ParseCaption(pick="first").map(rec)
  assert first["caption"] == "first" and "json" not in first
  assert T.ParseCaption(pick="all").map(rec)["captions"] == ["first", "second"]
  rand = T.ParseCaption(pick="random")
  assert isinstance(rand, grain.transforms.RandomMap) and isinstance(rand, T.RandomCaption)
  picks = {rand.random_map(rec, _rng(s))["caption"] for s in range(20)}
  assert picks == {"first", "second"}
  for s in range(5):  # caption_index points into the pick="all" list
    out = rand.random_map(rec, _rng(s))
    assert ["first", "second"][out["caption_index"]] == out["caption"]
  assert first["caption_index"] == 0
  assert rand.random_map(rec, _rng(3)) == rand.random_map(rec, _rng(3))
  assert T.ParseCaption(pick="first").map({"txt": b" a cat \n"})["caption"] == "a cat"
  single = {"json": json.dumps({"caption": "one"}).encode()}
  assert T.ParseCaption("caption", pick="all").map(single)["captions"] == ["one"]
  # Still picklable as the right type (pickle calls __new__ without the pick).
  assert pickle.loads(pickle.dumps(T.ParseCaption(pick="all"))).pick == "all"
  with pytest.raises(ValueError):
    T.ParseCaption(pick="best")


@pytest.mark.parametrize("record,reason", [
    ({"json": json.dumps({"captions": ["", "  "]}).encode()}, "no non-empty caption"),
    ({"json": b'{"captions": ["caf\xe9"]}'}, "not UTF-8"),
    ({"txt": b"\xff\xfe bad"}, "not UTF-8"),
    ({"json": b"{not json"}, "bad caption member"),
    ({"json": b'{"other": 1}'}, "bad caption member"),
    ({"jpg": b""}, "bad caption member"),
])
def test_parse_caption_marks_bad(record, reason):
  assert reason in T.ParseCaption(pick="first").map(record)["_bad"]
  assert reason in T.ParseCaption(pick="random").random_map(record, _rng())["_bad"]


def test_parse_label():
  out = T.ParseLabel().map({"cls": b"7\n"})
  assert out["label"] == 7 and out["label"].dtype == np.int32 and "cls" not in out
  assert "bad label" in T.ParseLabel().map({"cls": b"seven"})["_bad"]
  assert "no 'cls'" in T.ParseLabel().map({"jpg": b""})["_bad"]


def test_geometry_shapes_and_determinism():
  image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
  rec = {"image": image}
  center = T.ResizeCenterCrop(36, 32).map(rec)["image"]
  assert center.shape == (32, 32, 3) and center.dtype == np.uint8
  np.testing.assert_array_equal(center, T.ResizeCenterCrop(36, 32).map(rec)["image"])
  rrc = T.ResizeRandomCrop(36, 32)
  a, b = rrc.random_map(rec, _rng(1))["image"], rrc.random_map(rec, _rng(1))["image"]
  assert a.shape == (32, 32, 3)
  np.testing.assert_array_equal(a, b)
  crops = {rrc.random_map(rec, _rng(s))["image"].tobytes() for s in range(8)}
  assert len(crops) > 1
  rrc2 = T.RandomResizedCrop(24, scale=(0.3, 1.0))
  assert rrc2.random_map(rec, _rng(2))["image"].shape == (24, 24, 3)
  for s in range(50):
    top, left, ch, cw = rrc2.crop_box(40, 60, _rng(s))
    assert 0 <= top and top + ch <= 40 and 0 <= left and left + cw <= 60
  # Identity-size center crop is exact.
  np.testing.assert_array_equal(T.ResizeCenterCrop(40, 40).map({"image": image[:, :40]})["image"],
                                image[:, :40])
  flipped = T.RandomFlip(p=1.0).random_map(rec, _rng())["image"]
  np.testing.assert_array_equal(flipped, image[:, ::-1])
  assert T.RandomFlip(p=0.0).random_map(rec, _rng())["image"] is image
  with pytest.raises(ValueError):
    T.ResizeCenterCrop(30, 32)


def test_normalize():
  image = np.zeros((2, 4, 4, 3), np.uint8)  # also works with a leading batch axis
  image[..., 0] = 255
  out = T.Normalize().map({"image": image})["image"]
  assert out.dtype == np.float32 and out.shape == (2, 4, 4, 3)
  np.testing.assert_allclose(out[0, 0, 0], (np.array([1, 0, 0]) - T.CLIP_MEAN) / T.CLIP_STD, rtol=1e-6)


def test_tokenize():
  tok = tokenizers.get_tokenizer("clip_bpe")
  out = T.Tokenize(tok, 16).map({"caption": "a dog runs"})
  assert out["text"].shape == (16,) and out["text"].dtype == np.int32
  assert out["text_mask"].dtype == np.int32 and out["text_mask"].sum() == 5
  many = T.Tokenize(tok, 16, key="captions").map({"captions": ["a", "b c"]})
  assert many["text"].shape == (2, 16)
  assert "no 'caption'" in T.Tokenize(tok, 16).map({"__key__": "k"})["_bad"]


def test_bad_records_pass_through_untouched():
  bad = {"__key__": "k", "jpg": b"junk", "_bad": "earlier failure"}
  tok = tokenizers.get_tokenizer("clip_bpe")
  maps = [T.DecodeImage(), T.ParseCaption(pick="first"), T.ParseLabel(), T.ResizeCenterCrop(8, 8),
          T.Normalize(), T.Tokenize(tok, 8), T.KeepKeys(["image"])]
  for t in maps:
    assert t.map(bad) is bad, t
  for t in [T.ParseCaption(pick="random"), T.ResizeRandomCrop(8, 8), T.RandomResizedCrop(8),
            T.RandomFlip()]:
    assert t.random_map(bad, _rng()) is bad, t


def test_transforms_on_real_flickr_record(data_dir):
  record = sources.TarShardSource("flickr8k/val-*.tar", data_dir=data_dir)[0]
  out = T.DecodeImage().map(record)
  assert out["image"].shape == (160, 160, 3)
  out = T.ParseCaption(pick="all").map(out)
  assert len(out["captions"]) == 5 and all(out["captions"])
