"""Sunnybrook (SCD) expert contour files: parse, validate, write, and rasterize to masks.

An SCD contour file (`IM-0001-NNNN-icontour-manual.txt`) holds one `x y` pair per line in pixel
coordinates, x = column and y = row, written as `%.2f %.2f`. The polygon is implicitly closed.

Rasterization convention (`polygon_to_mask`): the vertices are floored to integer pixel indices
and the mask is the filled polygon *including* its boundary pixels. This is what `cv2.fillPoly`
does with `int32` points and what the expert masks of the Meow-2 PNG copy of the SCD were made
with: it reproduces all 96 icontour and 37 ocontour masks of the staged data exactly (Dice 1.0;
see `tests/contours_test.py`). Filling at pixel centres without the boundary
(`skimage.draw.polygon` on the raw coordinates) misses about 34 boundary pixels per frame.
"""

import math
import os
import re
from typing import Sequence

import numpy as np
from skimage import draw

# Contour kinds of the CAP release: file infix -> short name used in configs.
CONTOUR_KINDS = {
    'i': 'icontour',    # endocardium (the challenge's LV cavity)
    'o': 'ocontour',    # epicardium
    'p1': 'p1contour',  # papillary muscle 1
    'p2': 'p2contour',  # papillary muscle 2
}

_FILENAME_RE = re.compile(
    r'^IM-(?P<series>\d+)-(?P<instance>\d+)-(?P<kind>i|o|p1|p2)contour-manual\.txt$')


class ContourError(ValueError):
  """A contour file or array that cannot be used; the message names the source and the problem."""


def get_contour_kind(kind: str) -> str:
  """Returns the file infix ('icontour', ...) for a short contour kind ('i', 'o', 'p1', 'p2')."""
  if kind not in CONTOUR_KINDS:
    raise ValueError(f'Unknown contour kind {kind!r}; choices: {sorted(CONTOUR_KINDS)}')
  return CONTOUR_KINDS[kind]


def parse_contour_filename(name: str) -> tuple[int, str] | None:
  """Parses `IM-0001-NNNN-{i,o,p1,p2}contour-manual.txt` into (NNNN, kind); None if no match."""
  match = _FILENAME_RE.match(os.path.basename(name))
  if match is None:
    return None
  return int(match['instance']), match['kind']


def _shorten(line: str, limit: int = 40) -> str:
  return line if len(line) <= limit else line[:limit] + '...'


def parse_contour_text(text: str, source: str = '<string>',
                       image_shape: tuple[int, ...] | None = None) -> np.ndarray:
  """Parses and validates the text of a contour file.

  Args:
    text: file content, one `x y` pair per line; blank lines are ignored.
    source: name used in error messages (the file path).
    image_shape: (H, W, ...) of the frame; if given, every point must lie on the image
      (0 <= x < W, 0 <= y < H), i.e. floor to a valid pixel index.

  Returns:
    (P, 2) float64 array of (x, y) points, as in the file (a repeated closing point is kept).

  Raises:
    ContourError: empty text, a line that is not two finite numbers, fewer than 3 distinct
      points, or a point outside the image. The message names `source` and the line.
  """
  points = []
  line_numbers = []
  for lineno, line in enumerate(text.splitlines(), start=1):
    fields = line.split()
    if not fields:
      continue
    if len(fields) != 2:
      raise ContourError(f'{source}: line {lineno}: expected two numbers "x y", got '
                         f'{len(fields)} fields in {_shorten(line.strip())!r}')
    try:
      x, y = float(fields[0]), float(fields[1])
    except ValueError:
      raise ContourError(f'{source}: line {lineno}: non-numeric value in '
                         f'{_shorten(line.strip())!r}') from None
    if not (math.isfinite(x) and math.isfinite(y)):
      raise ContourError(f'{source}: line {lineno}: non-finite coordinate in '
                         f'{_shorten(line.strip())!r}')
    points.append((x, y))
    line_numbers.append(lineno)
  if not points:
    raise ContourError(f'{source}: empty contour file (no "x y" points)')
  contour = np.asarray(points, dtype=np.float64)
  num_distinct = len(np.unique(contour, axis=0))
  if num_distinct < 3:
    raise ContourError(f'{source}: only {num_distinct} distinct point(s); a contour needs at '
                       'least 3')
  if image_shape is not None:
    height, width = int(image_shape[0]), int(image_shape[1])
    outside = ((contour[:, 0] < 0) | (contour[:, 0] >= width) |
               (contour[:, 1] < 0) | (contour[:, 1] >= height))
    if outside.any():
      k = int(np.argmax(outside))
      raise ContourError(
          f'{source}: line {line_numbers[k]}: point (x={contour[k, 0]:g}, y={contour[k, 1]:g}) '
          f'lies outside the {height}x{width} image ({int(outside.sum())} point(s) outside)')
  return contour


def read_contour_file(path: str, image_shape: tuple[int, ...] | None = None) -> np.ndarray:
  """Reads and validates an SCD contour file.

  Args:
    path: the `.txt` file.
    image_shape: (H, W) of the matching frame, to reject points outside the image.

  Returns:
    (P, 2) float64 array of (x, y) pixel coordinates (x = column, y = row).

  Raises:
    ContourError: unreadable, not text, or invalid content (see `parse_contour_text`).
  """
  try:
    with open(path, 'rb') as f:
      raw = f.read()
  except OSError as e:
    raise ContourError(f'{path}: cannot read contour file: {e.strerror or e}') from None
  try:
    text = raw.decode('utf-8')
  except UnicodeDecodeError:
    raise ContourError(f'{path}: not a text file (invalid UTF-8)') from None
  if '\x00' in text:
    raise ContourError(f'{path}: not a text file (contains NUL bytes)')
  return parse_contour_text(text, source=str(path), image_shape=image_shape)


def validate_contour(contour: np.ndarray, source: str = '<array>') -> np.ndarray:
  """Checks that `contour` is a finite (P, 2) array with at least 3 distinct points."""
  contour = np.asarray(contour, dtype=np.float64)
  if contour.ndim != 2 or contour.shape[1] != 2:
    raise ContourError(f'{source}: contour must have shape (P, 2), got {contour.shape}')
  if not np.isfinite(contour).all():
    raise ContourError(f'{source}: contour has non-finite coordinates')
  if len(np.unique(contour, axis=0)) < 3:
    raise ContourError(f'{source}: contour needs at least 3 distinct points')
  return contour


def write_contour_file(path: str, contour: np.ndarray) -> None:
  """Writes a (P, 2) (x, y) contour in the SCD format (`%.2f %.2f`, LF), creating folders."""
  contour = validate_contour(contour, source=str(path))
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  with open(path, 'w', newline='\n') as f:
    f.writelines(f'{x:.2f} {y:.2f}\n' for x, y in contour)


def polygon_to_mask(contour: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """Rasterizes a closed (x, y) polygon into a {0, 1} uint8 mask of `shape` (H, W).

  Convention (matches the SCD expert masks, see the module docstring): vertices are floored to
  pixel indices, then the interior and the boundary pixels (straight lines between consecutive
  vertices, last to first) are set. Parts outside `shape` are cut off.
  """
  contour = np.asarray(contour, dtype=np.float64)
  if contour.ndim != 2 or contour.shape[1] != 2:
    raise ContourError(f'contour must have shape (P, 2), got {contour.shape}')
  shape = (int(shape[0]), int(shape[1]))
  mask = np.zeros(shape, dtype=np.uint8)
  if len(contour) == 0:
    return mask
  vertices = np.floor(contour)
  rows, cols = vertices[:, 1], vertices[:, 0]
  rr, cc = draw.polygon(rows, cols, shape=shape)
  mask[rr, cc] = 1
  # Boundary lines drawn directly rather than with draw.polygon_perimeter, which first clips the
  # polygon (through matplotlib) and may move vertices of self-intersecting input.
  rows, cols = rows.astype(np.int64), cols.astype(np.int64)
  next_rows, next_cols = np.roll(rows, -1), np.roll(cols, -1)
  for r0, c0, r1, c1 in zip(rows, cols, next_rows, next_cols):
    rr, cc = draw.line(r0, c0, r1, c1)
    inside = (rr >= 0) & (rr < shape[0]) & (cc >= 0) & (cc < shape[1])
    mask[rr[inside], cc[inside]] = 1
  return mask


def find_contour_files(contour_dir: str, kind: str = 'i') -> dict[int, str]:
  """Maps frame number NNNN -> path for the contour files of one kind in an expert folder.

  Raises:
    ContourError: two files of the same kind for one NNNN (the frame match would be ambiguous).
  """
  get_contour_kind(kind)
  found: dict[int, str] = {}
  for name in sorted(os.listdir(contour_dir)):
    parsed = parse_contour_filename(name)
    if parsed is None or parsed[1] != kind:
      continue
    path = os.path.join(contour_dir, name)
    if parsed[0] in found:
      raise ContourError(f'{path}: a second {CONTOUR_KINDS[kind]} for frame {parsed[0]:04d} '
                         f'(also {found[parsed[0]]})')
    found[parsed[0]] = path
  return found


def signed_area(contour: np.ndarray) -> float:
  """Shoelace area (pixels²) of a closed (P, 2) polygon, positive when counter-clockwise in
  (x, y); a repeated closing point is harmless."""
  c = np.asarray(contour, dtype=np.float64)
  if c.ndim != 2 or c.shape[1] != 2:
    raise ValueError(f'contour must have shape (P, 2), got {c.shape}')
  if len(c) < 3:
    return 0.0
  x, y = c[:, 0], c[:, 1]
  return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def offset_inward(contour: np.ndarray, distance_px: float) -> np.ndarray:
  """Moves every point of a closed (x, y) polygon `distance_px` along its inward normal.

  The normal at a point is perpendicular to the chord through its two neighbours. Meant for
  small offsets of smooth outlines (half a pixel on a sub-pixel contour); polygons of fewer than
  3 points are returned unchanged.
  """
  c = np.asarray(contour, dtype=np.float64)
  if len(c) < 3 or distance_px == 0:
    return c.copy()
  chord = np.roll(c, -1, axis=0) - np.roll(c, 1, axis=0)
  length = np.maximum(np.linalg.norm(chord, axis=1, keepdims=True), 1e-12)
  # (t_y, -t_x) points outward of a counter-clockwise polygon, inward of a clockwise one.
  outward = np.stack([chord[:, 1], -chord[:, 0]], axis=1) / length
  if signed_area(c) < 0:
    outward = -outward
  return c - distance_px * outward


def as_spacing(pixel_spacing: float | Sequence[float]) -> tuple[float, float]:
  """(row, col) pixel spacing in mm from a scalar or a pair; rejects non-positive values."""
  s = np.atleast_1d(np.asarray(pixel_spacing, dtype=np.float64)).ravel()
  if s.size == 1:
    s = np.repeat(s, 2)
  if s.size != 2 or not np.all(np.isfinite(s)) or np.any(s <= 0):
    raise ValueError(f'pixel_spacing must be positive (row, col) mm, got {pixel_spacing!r}')
  return float(s[0]), float(s[1])
