"""Paths of run outputs, local or in a bucket (`gs://`), through one filesystem layer.

Workdirs, checkpoints, metrics, TensorBoard events, embedding stores, descriptions and
exports are `etils.epath.Path`s, the layer orbax itself writes checkpoints through:
`gs://bucket/run` stays a URI (never `os.path.abspath`, which would turn it into
`./gs:/bucket/run` on local disk), a local path becomes absolute. Object stores have
no append and no rename: `write_atomic` writes a local file through a temporary name
and a rename, and an object in one upload, which is just as atomic there.

Orbax (through TensorStore) reads and writes checkpoints on local disk and on `gs://`
only, so those are the two schemes a workdir accepts.
"""
from __future__ import annotations

import io
import os
from typing import Any

from etils import epath
from tensorboardX import record_writer

SCHEMES = ("gs://",)  # what orbax's TensorStore drivers write, besides local paths


def is_uri(path: Any) -> bool:
  return "://" in os.fspath(path)


def path(location: Any, *, what: str = "path") -> epath.Path:
  """`location` as an epath.Path: a `gs://` URI as is, a local path made absolute."""
  text = os.fspath(location)
  if not text:
    raise ValueError(f"{what} is empty")
  if is_uri(text):
    if not text.startswith(SCHEMES):
      raise ValueError(f"{what} {text!r}: vlpre writes to local paths and {', '.join(SCHEMES)} "
                       f"URIs, not {text.split('://')[0]}://")
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def join_inside(folder: str, name: Any, *, what: str) -> str:
  """`folder`/`name` for a file name read from data (a caption list, a JSON of image names,
  a weight index). One that would leave `folder` (absolute, or '..' above it) is refused
  with a one-line ValueError: a name in a data file never points elsewhere on the disk."""
  text = os.fspath(name) if isinstance(name, (str, os.PathLike)) else None
  if (not text or os.path.isabs(text) or os.path.splitdrive(text)[0]
      or os.path.normpath(text).split(os.sep)[0] == os.pardir):
    raise ValueError(f"{what} {name!r} is not a relative path inside {folder}: names that "
                     "leave their folder (absolute, or '..' above it) are refused")
  return os.path.join(folder, text)


def write_atomic(target: epath.Path, data: bytes | str) -> None:
  """Writes `target` whole or not at all (a reader never sees half of it)."""
  mode = "w" if isinstance(data, str) else "wb"
  kwargs = {"encoding": "utf-8"} if isinstance(data, str) else {}
  if is_uri(target):  # an object appears when its upload completes
    with target.open(mode, **kwargs) as f:
      f.write(data)
    return
  tmp = target.parent / (target.name + ".tmp")
  with tmp.open(mode, **kwargs) as f:
    f.write(data)
  tmp.replace(target)


class _EpathEventFile:
  """A TensorBoard events file in a bucket: buffered, uploaded whole on every flush."""

  def __init__(self, location: str):
    self._path = epath.Path(location)
    self._buffer = io.BytesIO()

  def write(self, data: bytes) -> None:
    self._buffer.write(data)

  def flush(self) -> None:
    with self._path.open("wb") as f:
      f.write(self._buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _EpathEventFiles:
  """tensorboardX's writer factory for a URI scheme (it has no `makedirs` to do)."""

  def open(self, location: str) -> _EpathEventFile:
    return _EpathEventFile(location)

  def directory_check(self, location: str) -> None:
    epath.Path(location).mkdir(parents=True, exist_ok=True)


def use_epath_for_tensorboard() -> None:
  """Routes tensorboardX's `gs://` event files through epath (its own writer needs
  google-cloud-storage)."""
  for scheme in SCHEMES:
    record_writer.register_writer_factory(scheme.split(":")[0], _EpathEventFiles())


def upload_dir(local: epath.Path, target: epath.Path) -> None:
  """Copies every file under the local directory `local` to `target` (local or a URI)."""
  for file in sorted(p for p in local.rglob("*") if p.is_file()):
    destination = target / file.relative_to(local)
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_bytes(file.read_bytes())
