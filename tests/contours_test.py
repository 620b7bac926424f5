"""Tests for lvseg_jax.contours: SCD contour parsing, validation, writing and rasterization.

Oracles: the expert masks of the independent Meow-2 PNG copy (rasterized from the same text
files by other code), hand-computed rectangles, matplotlib's point-in-polygon test, and the
README's facts about the contour files.
"""

import collections
import glob
import math
import os

from hypothesis import given, settings, strategies as st
from matplotlib.path import Path
import numpy as np
from PIL import Image
import pytest

from lvseg_jax import contours

EXPERT_GLOB = os.path.join('SCD_ManualContours', '*', 'contours-manual', 'IRCCI-expert', '*.txt')


def _dice(a: np.ndarray, b: np.ndarray) -> float:
  a, b = a.astype(bool), b.astype(bool)
  return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _write(path, text: str) -> str:
  with open(path, 'w', newline='') as f:
    f.write(text)
  return str(path)


# ------------------------------------------------------------------------------ real data


def test_real_contour_files_parse(data_root):
  files = sorted(glob.glob(os.path.join(data_root, EXPERT_GLOB)))
  kinds = collections.Counter(contours.parse_contour_filename(p)[1] for p in files)
  # README: 96 icontour + 37 ocontour files, no p1/p2.
  assert kinds == {'i': 96, 'o': 37}
  lengths = []
  for path in files:
    points = contours.read_contour_file(path, image_shape=(256, 256))
    with open(path) as f:
      lines = [line for line in f.read().splitlines() if line.strip()]
    assert points.shape == (len(lines), 2)
    first = [float(v) for v in lines[0].split()]
    np.testing.assert_array_equal(points[0], first)
    lengths.append(len(points))
  # README: 57-384 points per contour.
  assert min(lengths) == 57 and max(lengths) == 384


@pytest.mark.parametrize('kind', ['i', 'o'])
def test_rasterization_reproduces_expert_png_masks(data_root, kind):
  """README: every staged contour rasterizes to exactly the Meow-2 mask (Dice 1.0)."""
  folders = sorted(glob.glob(os.path.join(data_root, 'SCD_ManualContours', '*')))
  compared = 0
  for folder in folders:
    case = os.path.basename(folder)
    expert = os.path.join(folder, 'contours-manual', 'IRCCI-expert')
    for number, path in contours.find_contour_files(expert, kind).items():
      label = os.path.join(data_root, 'derived_png_meow2', f'{kind}_labels',
                           f'{case}-IM-0001-{number:04d}.dcm.png')
      reference = np.asarray(Image.open(label)) > 127
      mask = contours.polygon_to_mask(contours.read_contour_file(path), reference.shape)
      assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
      assert _dice(mask, reference) == 1.0, path
      np.testing.assert_array_equal(mask.astype(bool), reference)
      compared += 1
  assert compared == {'i': 96, 'o': 37}[kind]


# ------------------------------------------------------------------------------ rasterization


def test_polygon_to_mask_rectangle_x_is_column():
  # Fractional vertices floor to columns 2..6 and rows 3..8, boundary included.
  rectangle = np.array([[2.7, 3.2], [6.5, 3.9], [6.0, 8.5], [2.0, 8.0]])
  expected = np.zeros((12, 10), np.uint8)
  expected[3:9, 2:7] = 1
  np.testing.assert_array_equal(contours.polygon_to_mask(rectangle, (12, 10)), expected)


def test_polygon_to_mask_clips_at_the_border():
  square = np.array([[-3.0, -3.0], [4.0, -3.0], [4.0, 4.0], [-3.0, 4.0]])
  expected = np.zeros((8, 8), np.uint8)
  expected[:5, :5] = 1
  np.testing.assert_array_equal(contours.polygon_to_mask(square, (8, 8)), expected)


@st.composite
def star_polygons(draw):
  """Simple (star-shaped) polygons inside a 40 x 40 image."""
  n = draw(st.integers(3, 12))
  angles = np.sort(np.asarray(draw(st.lists(st.floats(0, 2 * math.pi, exclude_max=True),
                                            min_size=n, max_size=n, unique=True))))
  radii = np.asarray(draw(st.lists(st.floats(1.0, 15.0), min_size=n, max_size=n)))
  cx, cy = draw(st.floats(16, 23)), draw(st.floats(16, 23))
  return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)


def _segment_distance(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
  ab = b - a
  t = np.clip(((points - a) @ ab) / max(ab @ ab, 1e-12), 0.0, 1.0)
  return np.linalg.norm(points - (a + t[:, None] * ab), axis=1)


@settings(max_examples=60, deadline=None, database=None)
@given(star_polygons())
def test_polygon_to_mask_covers_interior_and_stays_near_boundary(polygon):
  shape = (40, 40)
  mask = contours.polygon_to_mask(polygon, shape).astype(bool)
  vertices = np.floor(polygon)
  rows, cols = np.mgrid[:shape[0], :shape[1]]
  pixels = np.stack([cols.ravel(), rows.ravel()], axis=1).astype(float)
  inside = Path(vertices).contains_points(pixels).reshape(shape)
  # Every pixel strictly inside the floored polygon is set, and every vertex pixel.
  assert not (inside & ~mask).any()
  assert mask[vertices[:, 1].astype(int), vertices[:, 0].astype(int)].all()
  # Every set pixel is inside or within one pixel of an edge.
  near = np.zeros(len(pixels), bool)
  for a, b in zip(vertices, np.roll(vertices, -1, axis=0)):
    near |= _segment_distance(pixels, a, b) <= 1.0
  assert not (mask & ~(inside | near.reshape(shape))).any()


# ------------------------------------------------------------------------------ parse / write


@settings(max_examples=200, deadline=None, database=None)
@given(st.text(alphabet=st.sampled_from(list('0123456789.-+eE naif \t\n,x')) | st.characters(),
               max_size=200))
def test_parser_fuzz_returns_valid_contour_or_contour_error(text):
  try:
    points = contours.parse_contour_text(text, source='fuzz.txt', image_shape=(256, 256))
  except contours.ContourError as e:
    assert str(e).startswith('fuzz.txt: ')
    return
  assert points.ndim == 2 and points.shape[1] == 2
  assert np.isfinite(points).all()
  assert len(np.unique(points, axis=0)) >= 3
  assert (points >= 0).all() and (points < 256).all()


_coordinate = st.floats(0, 255.99, allow_nan=False).map(lambda v: round(v, 2))


@settings(max_examples=100, deadline=None, database=None)
@given(st.lists(st.tuples(_coordinate, _coordinate), min_size=3, max_size=50, unique=True),
       st.integers(0, 49), st.sampled_from(['1.0 abc', 'x y', '1 2 3', 'nan 4', '5', '7 inf']))
def test_parser_names_the_bad_line(points, position, bad_line):
  lines = [f'{x:.2f} {y:.2f}' for x, y in points]
  position = min(position, len(lines))
  lines.insert(position, bad_line)
  with pytest.raises(contours.ContourError, match=f'^c.txt: line {position + 1}: '):
    contours.parse_contour_text('\n'.join(lines), source='c.txt')


@settings(max_examples=60, deadline=None, database=None)
@given(st.lists(st.tuples(st.floats(0, 2000, allow_nan=False),
                          st.floats(0, 2000, allow_nan=False)), min_size=3, max_size=40))
def test_write_read_round_trip(tmp_path_factory, points):
  contour = np.asarray(points, float)
  rounded_distinct = len({(f'{x:.2f}', f'{y:.2f}') for x, y in points})
  path = os.path.join(tmp_path_factory.mktemp('rt'), 'IM-0001-0001-icontour-manual.txt')
  if len(np.unique(contour, axis=0)) < 3:
    with pytest.raises(contours.ContourError):
      contours.write_contour_file(path, contour)
    return
  contours.write_contour_file(path, contour)
  with open(path, newline='') as f:
    text = f.read()
  assert text.endswith('\n') and '\r' not in text and text.count('\n') == len(points)
  if rounded_distinct < 3:
    with pytest.raises(contours.ContourError, match='distinct'):
      contours.read_contour_file(path)
    return
  read = contours.read_contour_file(path)
  assert read.shape == contour.shape
  np.testing.assert_allclose(read, contour, atol=0.005 + 1e-9, rtol=0)


@pytest.mark.parametrize('text, message', [
    ('', 'empty contour file'),
    ('\n\n  \n', 'empty contour file'),
    ('1 2\n3 4\n', 'only 2 distinct point'),
    ('1 2\n3 4\n1 2\n3 4\n', 'only 2 distinct point'),
    ('1 2\n3 4\nfive 6\n', 'line 3: non-numeric'),
    ('1 2\n3 4 5\n6 7\n', 'line 2: expected two numbers'),
    ('1 2\n3 nan\n6 7\n', 'line 2: non-finite'),
    ('1 2\n3 4\n5 256\n', r'line 3: point \(x=5, y=256\) lies outside the 256x256 image'),
    ('1 2\n-0.5 4\n5 6\n', r'line 2: point \(x=-0.5, y=4\) lies outside'),
])
def test_bad_contour_files(tmp_path, text, message):
  path = _write(tmp_path / 'IM-0001-0001-icontour-manual.txt', text)
  with pytest.raises(contours.ContourError, match=message) as info:
    contours.read_contour_file(path, image_shape=(256, 256))
  assert str(info.value).startswith(f'{path}: ')


def test_point_on_last_column_is_inside(tmp_path):
  path = _write(tmp_path / 'c.txt', '255.99 0\n0 255.5\n100 100\n')
  np.testing.assert_array_equal(contours.read_contour_file(path, (256, 256))[0], [255.99, 0])


def test_binary_and_missing_files(tmp_path):
  binary = tmp_path / 'binary.txt'
  binary.write_bytes(b'\x89PNG\r\n\x1a\n\x00\x00\xff\xfe')
  with pytest.raises(contours.ContourError, match='not a text file'):
    contours.read_contour_file(str(binary))
  with pytest.raises(contours.ContourError, match='cannot read contour file'):
    contours.read_contour_file(str(tmp_path / 'absent.txt'))


def test_write_rejects_bad_arrays(tmp_path):
  path = str(tmp_path / 'c.txt')
  with pytest.raises(contours.ContourError, match=r'shape \(P, 2\)'):
    contours.write_contour_file(path, np.zeros((4, 3)))
  with pytest.raises(contours.ContourError, match='non-finite'):
    contours.write_contour_file(path, np.array([[0, 0], [1, np.inf], [2, 2]]))
  assert not os.path.exists(path)


def test_contour_file_names(tmp_path):
  assert contours.parse_contour_filename('IM-0001-0048-icontour-manual.txt') == (48, 'i')
  assert contours.parse_contour_filename('/x/IM-0001-0220-p2contour-manual.txt') == (220, 'p2')
  assert contours.parse_contour_filename('IM-0001-0048-icontour.txt') is None
  with pytest.raises(ValueError, match=r"choices: \['i', 'o', 'p1', 'p2'\]"):
    contours.get_contour_kind('x')
  for name in ('IM-0001-0048-icontour-manual.txt', 'IM-0001-0048-ocontour-manual.txt',
               'IM-0001-0068-icontour-manual.txt', 'notes.txt'):
    _write(tmp_path / name, '1 1\n2 2\n3 1\n')
  found = contours.find_contour_files(str(tmp_path), 'i')
  assert sorted(found) == [48, 68]
  _write(tmp_path / 'IM-0002-0048-icontour-manual.txt', '1 1\n2 2\n3 1\n')
  with pytest.raises(contours.ContourError, match='a second icontour for frame 0048'):
    contours.find_contour_files(str(tmp_path), 'i')


@pytest.mark.parametrize('clockwise', [False, True])
def test_offset_inward_shrinks_a_circle_by_the_distance(clockwise):
  t = np.linspace(0, 2 * np.pi, 400, endpoint=False) * (-1 if clockwise else 1)
  circle = np.stack([30 + 12 * np.cos(t), 25 + 12 * np.sin(t)], axis=1)
  inset = contours.offset_inward(circle, 0.5)
  # Each chord through a point's neighbours is perpendicular to its radius, so the normal is
  # exactly radial: every point lands on the circle of radius 11.5.
  np.testing.assert_allclose(np.hypot(inset[:, 0] - 30, inset[:, 1] - 25), 11.5, atol=1e-9)
  np.testing.assert_array_equal(contours.offset_inward(circle[:2], 0.5), circle[:2])
