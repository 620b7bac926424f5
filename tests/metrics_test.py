"""Tests of lvseg_jax.metrics against analytic cases and independent NumPy/SciPy oracles."""

import json
import math

import hypothesis
from hypothesis import strategies as st
from matplotlib.path import Path
import numpy as np
import pytest
from scipy.spatial import cKDTree
from scipy.spatial import distance as sp_distance

from configs import default

from lvseg_jax import clinical
from lvseg_jax import contours
from lvseg_jax import data
from lvseg_jax import metrics
from lvseg_jax import results as results_lib

FAST = hypothesis.settings(max_examples=12, deadline=None, derandomize=True)


# ----------------------------------------------------------------------------------------------
# Independent helpers (no use of the module under test)


def circle(cx, cy, r, n, phase=0.0):
  t = phase + 2 * np.pi * np.arange(n) / n
  return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def ellipse(cx, cy, ax, ay, n, phase=0.0):
  t = phase + 2 * np.pi * np.arange(n) / n
  return np.stack([cx + ax * np.cos(t), cy + ay * np.sin(t)], axis=1)


def disk_mask(shape, cx, cy, r):
  """Pixel centres (x = col, y = row) within radius r."""
  y, x = np.mgrid[:shape[0], :shape[1]]
  return ((x - cx) ** 2 + (y - cy) ** 2 <= r * r).astype(np.uint8)


def polygon_mask(polygon, shape):
  """Pixel centres inside the (x, y) polygon, via matplotlib's point-in-polygon."""
  y, x = np.mgrid[:shape[0], :shape[1]]
  inside = Path(polygon).contains_points(np.stack([x.ravel(), y.ravel()], axis=1))
  return inside.reshape(shape).astype(np.uint8)


def densify(poly, n):
  """n points uniformly spaced in arc length along a closed polygon."""
  closed = np.vstack([poly, poly[:1]])
  cum = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(closed, axis=0), axis=1))])
  s = np.linspace(0.0, cum[-1], n, endpoint=False)
  return np.stack([np.interp(s, cum, closed[:, 0]), np.interp(s, cum, closed[:, 1])], axis=1)


def kdtree_mcd_hd95(a, b, n=10000):
  """Oracle: dense uniform samples of both contours, nearest-neighbour distances by cKDTree."""
  da, db = densify(a, n), densify(b, n)
  d_ab = cKDTree(db).query(da)[0]
  d_ba = cKDTree(da).query(db)[0]
  mcd = 0.5 * (d_ab.mean() + d_ba.mean())
  hd95 = max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))
  return mcd, hd95


def shoelace(c):
  x, y = c[:, 0], c[:, 1]
  return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


# ----------------------------------------------------------------------------------------------
# Dice


def test_dice_identical_disjoint_and_empty():
  a = disk_mask((64, 64), 30, 30, 10)
  b = np.zeros_like(a)
  b[:5, :5] = 1
  assert metrics.dice(a, a) == 1.0
  assert metrics.dice(a, b) == 0.0
  assert metrics.dice(np.zeros_like(a), a) == 0.0
  assert metrics.dice(np.zeros_like(a), np.zeros_like(a)) == 1.0


@pytest.mark.parametrize('seed,p_pred,p_target', [(0, 0.5, 0.5), (1, 0.1, 0.7), (2, 0.02, 0.03)])
def test_dice_matches_scipy_on_random_masks(seed, p_pred, p_target):
  rng = np.random.default_rng(seed)
  pred = rng.random((37, 53)) < p_pred
  target = rng.random((37, 53)) < p_target
  expected = 1.0 - sp_distance.dice(pred.ravel(), target.ravel())
  assert metrics.dice(pred, target) == pytest.approx(expected, abs=1e-12)
  # Integer {0, 1} masks and uint8 masks give the same answer as bool masks.
  assert metrics.dice(pred.astype(np.int32), target.astype(np.uint8)) == pytest.approx(expected)


def test_dice_rejects_shape_mismatch():
  with pytest.raises(ValueError):
    metrics.dice(np.zeros((4, 4)), np.zeros((4, 5)))


# ----------------------------------------------------------------------------------------------
# Mask -> contour


def test_mask_to_contour_follows_x_col_y_row_and_half_pixel_boundary():
  mask = np.zeros((12, 16), np.uint8)
  mask[2:6, 3:11] = 1  # rows 2..5 (4 high), cols 3..10 (8 wide)
  c = metrics.mask_to_contour(mask)
  assert c.ndim == 2 and c.shape[1] == 2 and c.dtype == np.float64
  # x spans columns, y rows, each half a pixel beyond the outer pixel centres.
  assert c[:, 0].min() == pytest.approx(2.5) and c[:, 0].max() == pytest.approx(10.5)
  assert c[:, 1].min() == pytest.approx(1.5) and c[:, 1].max() == pytest.approx(5.5)
  # Marching squares cuts each of the 4 corners by a right triangle of legs 0.5.
  assert shoelace(c) == pytest.approx(8 * 4 - 4 * 0.125)
  assert not np.array_equal(c[0], c[-1])  # no repeated closing point


def test_mask_to_contour_empty_and_border_touching():
  assert metrics.mask_to_contour(np.zeros((8, 8))).shape == (0, 2)
  c = metrics.mask_to_contour(np.ones((6, 9)))
  assert c[:, 0].min() == pytest.approx(-0.5) and c[:, 0].max() == pytest.approx(8.5)
  assert c[:, 1].min() == pytest.approx(-0.5) and c[:, 1].max() == pytest.approx(5.5)


def test_mask_to_contour_keeps_largest_component_and_ignores_holes():
  mask = disk_mask((80, 80), 30, 40, 15)
  mask[5:9, 60:64] = 1  # small separate blob
  mask[38:43, 28:33] = 0  # hole inside the large disk
  c = metrics.mask_to_contour(mask)
  r = np.hypot(c[:, 0] - 30, c[:, 1] - 40)
  assert np.all(np.abs(r - 15) < 1.0)  # every point on the outer boundary of the disk


def test_mask_to_contour_picks_component_by_pixel_count_not_enclosed_area():
  # A thin ring encloses the most area, but the solid disk inside it has more pixels.
  y, x = np.mgrid[:100, :100]
  r = np.hypot(x - 50, y - 50)
  ring = (r >= 30) & (r <= 31.5)
  disk = r <= 12
  assert disk.sum() > ring.sum()
  c = metrics.mask_to_contour((ring | disk).astype(np.uint8))
  assert np.all(np.abs(np.hypot(c[:, 0] - 50, c[:, 1] - 50) - 12) < 1.0)


def test_mask_contour_tracks_the_polygon_it_was_rasterized_from():
  t = np.linspace(0, 2 * np.pi, 400, endpoint=False)
  rad = 18 + 3 * np.sin(3 * t) + 1.5 * np.cos(5 * t)
  poly = np.stack([40.3 + rad * np.cos(t), 37.8 + rad * np.sin(t)], axis=1)
  c = metrics.mask_to_contour(polygon_mask(poly, (80, 80)))
  d = cKDTree(densify(poly, 20000)).query(c)[0]
  # Half a pixel along an axis, up to ~0.71 px where marching squares cuts a diagonal corner.
  assert d.max() < 0.75
  assert d.mean() < 0.35


# ----------------------------------------------------------------------------------------------
# APD


@pytest.mark.parametrize('cx,cy,r1,r2,n1,n2', [
    (60.0, 70.0, 20.0, 25.0, 100, 200),
    (60.0, 70.0, 25.0, 20.0, 300, 160),
    (33.3, 91.7, 10.0, 11.0, 57, 384),
    (128.0, 128.0, 15.0, 27.0, 240, 240),
    (50.5, 50.5, 30.0, 30.0, 120, 250),
])
def test_apd_concentric_analytic_polygons(cx, cy, r1, r2, n1, n2):
  auto = circle(cx, cy, r1, n1, phase=0.3)
  expert = circle(cx, cy, r2, n2, phase=1.1)
  # The expert tangent line at a vertex at most pi/n2 off the normal is r2 / cos(pi/n2) away.
  tol = r2 * (1 / math.cos(math.pi / n2) - 1) + 1e-9
  assert metrics.apd_mm(auto, expert, 1.0) == pytest.approx(abs(r1 - r2), abs=tol)
  # No point needed a fallback.
  _, method = metrics.perpendicular_distances_mm(auto, expert, 1.0)
  assert np.all(method == metrics.APD_NORMAL_LINE)


def _random_disks(seed, n):
  rng = np.random.default_rng(seed)
  for _ in range(n):
    cx, cy = rng.uniform(40, 60, 2)
    r1 = rng.uniform(8, 30)
    yield cx, cy, r1, r1 + rng.uniform(-6, 6)


@pytest.mark.parametrize('cx,cy,r1,r2', list(_random_disks(0, 8)))
def test_apd_concentric_rasterized_disks(cx, cy, r1, r2):
  auto = metrics.mask_to_contour(disk_mask((100, 100), cx, cy, r1))
  expert_mask_contour = metrics.mask_to_contour(disk_mask((100, 100), cx, cy, r2))
  expert_polygon = circle(cx, cy, r2, 300)
  # Pixelization: both staircase contours lie within ~0.5 px of their circles; the errors
  # largely cancel along the contour.
  assert metrics.apd_mm(auto, expert_mask_contour, 1.0) == pytest.approx(abs(r1 - r2), abs=0.2)
  assert metrics.apd_mm(auto, expert_polygon, 1.0) == pytest.approx(abs(r1 - r2), abs=0.2)


@pytest.mark.parametrize('cx,cy,r_small,gap', [(47.3, 52.1, 9.0, 12.0), (55.0, 44.6, 12.5, 9.5)])
def test_apd_rasterized_disks_far_apart_no_staircase_bias(cx, cy, r_small, gap):
  # The normals of a staircase contour must follow the circle, not the pixel steps: an error
  # of 20 degrees would add gap * (1 / cos(20 deg) - 1) ~ 0.7 px at these gaps.
  for r_auto, r_expert in [(r_small, r_small + gap), (r_small + gap, r_small)]:
    auto = metrics.mask_to_contour(disk_mask((100, 100), cx, cy, r_auto))
    assert metrics.apd_mm(auto, circle(cx, cy, r_expert, 300), 1.0) == pytest.approx(gap, abs=0.3)


def test_identical_masks_dice_one_distances_zero():
  rng = np.random.default_rng(3)
  blob = (disk_mask((64, 64), 30, 30, 14) | disk_mask((64, 64), 41, 36, 9)).astype(np.uint8)
  blob[rng.random(blob.shape) < 0.02] = 0  # irregular boundary
  c = metrics.mask_to_contour(blob)
  assert metrics.dice(blob, blob) == 1.0
  assert metrics.apd_mm(c, c, 1.3) == pytest.approx(0.0, abs=1e-9)
  assert metrics.mean_contour_distance_mm(c, c, 1.3) == pytest.approx(0.0, abs=1e-9)
  assert metrics.hausdorff95_mm(c, c, 1.3) == pytest.approx(0.0, abs=1e-9)
  frame = metrics.evaluate_frame(blob, blob, (1.3, 1.3))
  assert frame['dice'] == 1.0 and frame['apd_mm'] == pytest.approx(0.0, abs=1e-9)
  assert frame['detected'] and frame['good']


def test_disjoint_masks_dice_zero_and_apd_at_least_the_gap():
  pred = disk_mask((100, 100), 25, 50, 10)
  expert = disk_mask((100, 100), 75, 50, 10)
  frame = metrics.evaluate_frame(pred, expert, (1.0, 1.0))
  assert frame['dice'] == 0.0
  # The closest points of the two contours are ~30 px apart.
  assert frame['apd_mm'] >= 29.0 and frame['mcd_mm'] >= 29.0 and frame['hd95_mm'] >= 29.0
  assert frame['detected'] and not frame['good']


@FAST
@hypothesis.given(s=st.floats(0.3, 3.0))
def test_distances_scale_linearly_with_isotropic_spacing(s):
  auto = metrics.mask_to_contour(disk_mask((90, 90), 44.2, 47.9, 19))
  expert = ellipse(46.0, 45.0, 23.0, 17.0, 180)
  for fn in (metrics.apd_mm, metrics.mean_contour_distance_mm, metrics.hausdorff95_mm):
    assert fn(auto, expert, (s, s)) == pytest.approx(s * fn(auto, expert, 1.0), rel=1e-9)


@pytest.mark.parametrize('spacing', [(1.0, 2.0), (1.5, 0.75), (1.25, 1.3672)])
def test_anisotropic_spacing_is_applied_per_axis(spacing):
  # Ellipses in pixels that are concentric circles of 20 and 24 mm radius in mm.
  row_mm, col_mm = spacing
  auto = ellipse(50, 50, 20 / col_mm, 20 / row_mm, 400)
  expert = ellipse(50, 50, 24 / col_mm, 24 / row_mm, 400, phase=0.01)
  assert metrics.apd_mm(auto, expert, spacing) == pytest.approx(4.0, abs=0.01)
  assert metrics.mean_contour_distance_mm(auto, expert, spacing) == pytest.approx(4.0, abs=0.01)
  assert metrics.hausdorff95_mm(auto, expert, spacing) == pytest.approx(4.0, abs=0.01)


@FAST
@hypothesis.given(theta=st.floats(0, 2 * np.pi), tx=st.floats(-50, 50), ty=st.floats(-50, 50))
def test_apd_is_invariant_to_rigid_motion(theta, tx, ty):
  auto = ellipse(0.0, 0.0, 22.0, 15.0, 150)
  expert = circle(2.0, -1.0, 19.0, 210, phase=0.2)
  rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
  move = lambda c: c @ rot.T + np.array([tx, ty])
  assert metrics.apd_mm(move(auto), move(expert), 1.0) == pytest.approx(
      metrics.apd_mm(auto, expert, 1.0), abs=1e-6)


def test_largest_component_selection_in_apd():
  expert = disk_mask((120, 120), 60, 60, 25)
  pred_clean = disk_mask((120, 120), 60, 60, 22)
  pred_noisy = pred_clean.copy()
  pred_noisy[5:12, 100:110] = 1  # spurious blob far from the LV
  clean = metrics.evaluate_frame(pred_clean, expert, (1.0, 1.0))
  noisy = metrics.evaluate_frame(pred_noisy, expert, (1.0, 1.0))
  assert noisy['apd_mm'] == clean['apd_mm']
  assert noisy['apd_mm'] == pytest.approx(3.0, abs=0.2)
  # Dice is on the masks as given, so the blob costs Dice.
  expected_dice = 2 * np.sum(pred_noisy & expert) / (pred_noisy.sum() + expert.sum())
  assert noisy['dice'] == pytest.approx(expected_dice) and noisy['dice'] < clean['dice']


def test_apd_ignores_duplicate_and_closing_points():
  auto = ellipse(50, 50, 20, 14, 90)
  expert = circle(51, 49, 17, 120)
  base = metrics.apd_mm(auto, expert, 1.0)
  auto_dup = np.repeat(auto, 3, axis=0)  # every point three times
  auto_closed = np.vstack([auto, auto[:1]])
  expert_dup = np.insert(expert, [5, 5, 40], expert[[4, 4, 39]], axis=0)
  assert metrics.apd_mm(auto_dup, expert, 1.0) == pytest.approx(base, abs=1e-12)
  assert metrics.apd_mm(auto_closed, expert, 1.0) == pytest.approx(base, abs=1e-12)
  assert metrics.apd_mm(auto, expert_dup, 1.0) == pytest.approx(base, abs=1e-12)


def test_apd_with_few_points():
  expert = circle(0.0, 0.0, 10.0, 400)
  # One point: its distance to the expert contour.
  assert metrics.apd_mm(np.array([[3.0, 4.0]]), expert, 1.0) == pytest.approx(5.0, abs=1e-3)
  # Two points: the chord between them is the tangent, so each normal is the vertical line
  # x = +-2, which meets the circle at y = sqrt(100 - 4) (the nearest point would give 8).
  # The 400-gon is within 10 (1 - cos(pi / 400)) = 3e-4 of the circle.
  two = np.array([[-2.0, 0.0], [2.0, 0.0]])
  three = circle(0.0, 0.0, 4.0, 3)
  assert metrics.apd_mm(two, expert, 1.0) == pytest.approx(math.sqrt(96.0), abs=1e-3)
  assert metrics.apd_mm(three, expert, 1.0) == pytest.approx(6.0, abs=0.05)
  # A contour that is a single repeated point collapses to one point.
  assert metrics.apd_mm(np.array([[0.0, 6.0]] * 4), expert, 1.0) == pytest.approx(4.0, abs=1e-3)


@pytest.mark.parametrize('n_expert', [4, 40])
def test_apd_normals_parallel_to_expert_segments(n_expert):
  # Expert: square [0, 10]^2 (corners only, or a point every pixel). Automatic: square
  # [-2, 12]^2 with a point every pixel. The normals at auto points (0, -2), (10, -2), (12, 0),
  # ... lie on the expert's edges: parallel to them and through their end points.
  expert = densify(np.array([[0.0, 0.0], [10.0, 0.0], [10.0, 10.0], [0.0, 10.0]]), n_expert)
  auto = densify(np.array([[-2.0, -2.0], [12.0, -2.0], [12.0, 12.0], [-2.0, 12.0]]), 56)
  dist, method = metrics.perpendicular_distances_mm(auto, expert, 1.0)
  assert np.all(np.isfinite(dist)) and np.all(dist >= 0)

  def at(point):
    return dist[int(np.argmin(np.linalg.norm(auto - point, axis=1)))]

  for point in ([0.0, -2.0], [10.0, -2.0], [12.0, 0.0], [12.0, 10.0], [0.0, 12.0], [-2.0, 10.0]):
    assert at(point) == pytest.approx(2.0, abs=1e-9), point
  # Mid-edge normals meet the expert edge 2 away. With corners only, the line through the
  # nearest expert corner is a diagonal that the normal meets far from the contour: that
  # intersection is rejected and the crossing with the expert edge is used.
  for point in ([3.0, -2.0], [5.0, -2.0], [7.0, 12.0], [12.0, 6.0]):
    assert at(point) == pytest.approx(2.0, abs=1e-9), point
  if n_expert > 4:
    # Dense expert: edges are 2 away, and the corner normals (diagonal by symmetry) reach the
    # expert corners 2*sqrt(2) away.
    for point in ([5.0, -2.0], [12.0, 5.0], [5.0, 12.0], [-2.0, 3.0]):
      assert at(point) == pytest.approx(2.0, abs=1e-9), point
    for point in ([-2.0, -2.0], [12.0, -2.0], [12.0, 12.0], [-2.0, 12.0]):
      assert at(point) == pytest.approx(2 * math.sqrt(2), abs=1e-9), point
  # Excluding fallbacks (compare_contours.m behaviour) averages a subset of the same distances.
  excluded = metrics.apd_mm(auto, expert, 1.0, exclude_fallbacks=True)
  assert excluded == pytest.approx(dist[method == metrics.APD_NORMAL_LINE].mean())


def test_apd_empty_contours_are_nan():
  c = circle(0, 0, 5, 20)
  assert math.isnan(metrics.apd_mm(np.zeros((0, 2)), c, 1.0))
  assert math.isnan(metrics.apd_mm(c, np.zeros((0, 2)), 1.0))
  assert math.isnan(metrics.mean_contour_distance_mm(c, np.zeros((0, 2)), 1.0))
  assert math.isnan(metrics.hausdorff95_mm(np.zeros((0, 2)), c, 1.0))


def test_bad_inputs_raise():
  with pytest.raises(ValueError):
    metrics.apd_mm(np.zeros((5, 3)), circle(0, 0, 5, 20), 1.0)
  with pytest.raises(ValueError):
    metrics.apd_mm(circle(0, 0, 5, 20), circle(0, 0, 6, 20), (1.0, -1.0))
  with pytest.raises(ValueError):
    metrics.apd_mm(np.array([[0.0, np.nan], [1, 1], [2, 0]]), circle(0, 0, 6, 20), 1.0)


# ----------------------------------------------------------------------------------------------
# MCD and HD95


@pytest.mark.parametrize('a,b', [
    (circle(50, 50, 20, 200), ellipse(53, 48, 24, 17, 300)),
    (np.array([[30.0, 30.0], [70.0, 30.0], [70.0, 70.0], [30.0, 70.0]]), circle(52, 49, 22, 360)),
    (ellipse(40, 40, 10, 25, 150), ellipse(44, 38, 25, 10, 150)),
])
def test_mcd_and_hd95_match_kdtree_oracle(a, b):
  mcd, hd95 = kdtree_mcd_hd95(a, b)
  assert metrics.mean_contour_distance_mm(a, b, 1.0) == pytest.approx(mcd, abs=1e-3)
  # A percentile of finitely many samples: looser than the mean.
  assert metrics.hausdorff95_mm(a, b, 1.0) == pytest.approx(hd95, abs=0.02)
  assert metrics.mean_contour_distance_mm(b, a, 1.0) == pytest.approx(
      metrics.mean_contour_distance_mm(a, b, 1.0), abs=1e-9)
  assert metrics.hausdorff95_mm(b, a, 1.0) == pytest.approx(
      metrics.hausdorff95_mm(a, b, 1.0), abs=1e-9)


def test_mcd_hd95_offset_circles_analytic():
  # Circles of equal radius r offset by d: the exact distance of a point p of A to circle B is
  # | |p - c_B| - r |, sampled densely in angle (uniform in arc length on a circle).
  r, d = 20.0, 3.0
  a, b = circle(0, 0, r, 720), circle(d, 0, r, 720)
  t = np.linspace(0, 2 * np.pi, 200000, endpoint=False)
  p = np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
  da = np.abs(np.hypot(p[:, 0] - d, p[:, 1]) - r)  # by symmetry d(B->A) has the same distribution
  assert metrics.mean_contour_distance_mm(a, b, 1.0) == pytest.approx(da.mean(), abs=2e-3)
  assert metrics.hausdorff95_mm(a, b, 1.0) == pytest.approx(np.percentile(da, 95), abs=2e-3)


def all_segments_distance(points, poly):
  """Oracle: distance of each point to every segment of the closed polygon, the least kept."""
  best = np.full(len(points), np.inf)
  for p, q in zip(poly, np.roll(poly, -1, axis=0)):
    d = q - p
    t = np.clip((points - p) @ d / max(d @ d, 1e-300), 0.0, 1.0)
    best = np.minimum(best, np.linalg.norm(points - (p + t[:, None] * d), axis=1))
  return best


def test_point_to_polyline_is_exact_on_ragged_and_long_segment_polygons():
  rng = np.random.default_rng(0)
  # A ragged random-walk outline (an untrained model's contour) and points around it.
  walk = np.cumsum(rng.choice([-1.0, 0.0, 1.0], size=(400, 2)), axis=0) + 50.0
  # A square drawn densely on three sides and by one 100-px segment on the fourth: a point near
  # that segment is far from every vertex, so a distance to vertices would be wrong there.
  side = np.linspace(0.0, 100.0, 201)[:-1]
  square = np.concatenate([np.stack([100 + 0 * side, side], 1), np.stack([100 - side,
                          100 + 0 * side], 1), np.stack([0 * side, 100 - side], 1)])
  square = np.vstack([square, [[0.0, 0.0]]])   # closes with (0, 0) -> (100, 0)
  # 40 vertices at random angles and radii: short and long segments side by side.
  stars = []
  for _ in range(4):
    angle, radius = np.sort(rng.uniform(0, 2 * np.pi, 40)), rng.uniform(25, 55, 40)
    stars.append(np.stack([50 + radius * np.cos(angle), 50 + radius * np.sin(angle)], axis=1))
  triangle = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 5.0]])
  for poly in (walk, square, *stars, triangle):
    points = rng.uniform(poly.min() - 5, poly.max() + 5, size=(20000, 2))
    points = np.vstack([points, poly + rng.normal(0, 0.3, poly.shape)])
    got = metrics._point_to_polyline(points, poly)  # pylint: disable=protected-access
    # Same point-to-segment distance, a different formula: float64 rounding only.
    np.testing.assert_allclose(got, all_segments_distance(points, poly), rtol=0, atol=1e-9)
  near_long = np.array([[10.0, 1.0], [50.0, -2.0], [90.0, 0.5]])
  np.testing.assert_allclose(metrics._point_to_polyline(  # pylint: disable=protected-access
      near_long, square), [1.0, 2.0, 0.5], rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Frames, cases, sets


def test_evaluate_frame_prefers_expert_polygon():
  mask = disk_mask((100, 100), 50, 50, 20)
  from_mask = metrics.evaluate_frame(mask, mask, (1.5, 1.5))
  from_poly = metrics.evaluate_frame(mask, mask, (1.5, 1.5), expert_contour=circle(50, 50, 23, 300),
                                     spacing_source='table')
  assert from_mask['expert_contour_from'] == 'mask' and from_mask['apd_mm'] == pytest.approx(0.0)
  assert from_poly['expert_contour_from'] == 'polygon'
  assert from_poly['apd_mm'] == pytest.approx(3 * 1.5, abs=0.2 * 1.5)
  assert from_poly['dice'] == 1.0  # Dice stays on the masks
  assert from_poly['spacing_source'] == 'table' and from_poly['pixel_spacing_mm'] == [1.5, 1.5]


def test_evaluate_frame_scores_a_given_automatic_contour():
  """APD and the contour distances follow `auto_contour` (e.g. predict's sub-pixel one); Dice
  stays on the masks. The expert polygon itself scores 0 mm; the outline of its rasterized
  mask lies about half a pixel outside it."""
  polygon = circle(50, 50, 20, 400)
  mask = contours.polygon_to_mask(polygon, (100, 100))
  exact = metrics.evaluate_frame(mask, mask, (1.5, 1.5), expert_contour=polygon,
                                 auto_contour=polygon)
  outline = metrics.evaluate_frame(mask, mask, (1.5, 1.5), expert_contour=polygon)
  assert exact['apd_mm'] == pytest.approx(0.0, abs=1e-9)
  assert exact['hd95_mm'] == pytest.approx(0.0, abs=1e-9)
  assert 0.3 * 1.5 < outline['apd_mm'] < 0.8 * 1.5   # the rasterization's outset (0.55 px)
  assert exact['dice'] == outline['dice'] == 1.0 and exact['n_auto_points'] == 400


def test_evaluate_frame_undetected():
  expert = disk_mask((64, 64), 30, 30, 12)
  frame = metrics.evaluate_frame(np.zeros_like(expert), expert, (1.0, 1.0))
  assert not frame['detected'] and not frame['good'] and frame['dice'] == 0.0
  assert math.isnan(frame['apd_mm']) and math.isnan(frame['mcd_mm'])
  assert math.isnan(frame['hd95_mm'])


def _synthetic_records():
  """Three cases of concentric disks whose APD class (good / bad / undetected) is built in."""
  shape, c = (96, 96), (48.0, 47.0)
  # (case, spacing, source, expert radius, list of predicted radius or None = empty prediction)
  plan = [
      ('A', 1.5, 'dicom', 20, [20, 22, 26, None]),  # APD ~ 0, 3, 9 mm, undetected
      ('B', 1.0, 'table', 18, [19, 21, 17]),        # 1, 3, 1 mm: all good
      ('C', 2.0, 'nominal', 22, [25, None]),        # 6 mm (bad), undetected: no good contour
  ]
  records, truth = [], []
  for case, s, source, r_exp, preds in plan:
    expert = disk_mask(shape, *c, r_exp)
    for k, r_pred in enumerate(preds):
      pred = np.zeros(shape, np.uint8) if r_pred is None else disk_mask(shape, *c, r_pred)
      records.append({'case': case, 'frame_id': f'IM-0001-{k:04d}', 'pred_mask': pred,
                      'expert_mask': expert, 'pixel_spacing': (s, s), 'spacing_source': source})
      inter, total = np.sum(pred & expert), pred.sum() + expert.sum()
      truth.append({
          'case': case,
          'dice': 2.0 * inter / total,
          'detected': r_pred is not None,
          'good': r_pred is not None and abs(r_pred - r_exp) * s < 5.0,
          'apd_expected': None if r_pred is None else abs(r_pred - r_exp) * s,
      })
  return records, truth


def test_evaluate_aggregates_per_case_and_per_set():
  records, truth = _synthetic_records()
  res = results_lib.evaluate(records)
  frames = res['per_frame']
  assert [f['case'] for f in frames] == [t['case'] for t in truth]
  for f, t in zip(frames, truth):
    assert f['dice'] == pytest.approx(t['dice'])
    assert f['detected'] == t['detected'] and f['good'] == t['good']
    if t['detected']:
      assert f['apd_mm'] == pytest.approx(t['apd_expected'], abs=0.2 * f['pixel_spacing_mm'][0])

  apd = np.array([np.nan if f['apd_mm'] is None else f['apd_mm'] for f in frames])
  mcd = np.array([f['mcd_mm'] for f in frames])
  hd95 = np.array([np.nan if f['hd95_mm'] is None else f['hd95_mm'] for f in frames])
  dice = np.array([t['dice'] for t in truth])
  good = np.array([t['good'] for t in truth])
  det = np.array([t['detected'] for t in truth])
  cases = np.array([t['case'] for t in truth])

  assert list(res['per_case']) == ['A', 'B', 'C']
  expected_pct = {'A': (75.0, 50.0), 'B': (100.0, 100.0), 'C': (50.0, 0.0)}
  per_case_expected = {}
  for case in ['A', 'B', 'C']:
    m = cases == case
    pc = res['per_case'][case]
    assert pc['n_frames'] == m.sum()
    assert (pc['detected_pct'], pc['good_pct']) == expected_pct[case]
    exp = {
        'detected_pct': expected_pct[case][0],
        'good_pct': expected_pct[case][1],
        'dice_good': dice[m & good].mean() if (m & good).any() else np.nan,
        'apd_good_mm': apd[m & good].mean() if (m & good).any() else np.nan,
        'dice_all': dice[m].mean(),
        'apd_detected_mm': apd[m & det].mean(),
        'mcd_detected_mm': mcd[m & det].mean(),
        'hd95_detected_mm': hd95[m & det].mean(),
    }
    per_case_expected[case] = exp
    for key, value in exp.items():
      if np.isnan(value):
        assert math.isnan(pc[key]), (case, key)
      else:
        assert pc[key] == pytest.approx(value), (case, key)
  # Undetected frames enter Dice (all) as 0.
  assert res['per_case']['A']['dice_all'] == pytest.approx(dice[:3].sum() / 4)

  over = res['per_set']['mean_std_over_cases']
  assert over['n_cases'] == 3
  for key in ['detected_pct', 'good_pct', 'dice_good', 'apd_good_mm', 'dice_all',
              'apd_detected_mm', 'mcd_detected_mm', 'hd95_detected_mm']:
    vals = np.array([per_case_expected[c][key] for c in 'ABC'])
    vals = vals[~np.isnan(vals)]
    assert over[key]['n'] == len(vals), key
    assert over[key]['mean'] == pytest.approx(vals.mean()), key
    assert over[key]['std'] == pytest.approx(np.std(vals, ddof=1)), key
  assert over['dice_good']['n'] == 2  # case C has no good contour

  img = res['per_set']['per_image']
  assert img['n_frames'] == len(truth)
  assert img['detected_pct'] == pytest.approx(100 * det.mean())
  assert img['good_pct'] == pytest.approx(100 * good.mean())
  assert img['dice_all']['mean'] == pytest.approx(dice.mean())
  assert img['dice_all']['std'] == pytest.approx(np.std(dice, ddof=1))
  assert img['dice_good']['mean'] == pytest.approx(dice[good].mean())
  assert img['apd_good_mm']['mean'] == pytest.approx(apd[good].mean())
  assert img['apd_detected_mm']['n'] == det.sum()
  assert res['spacing_sources'] == {'dicom': 4, 'table': 3, 'nominal': 2}


def test_evaluate_threshold_changes_good():
  records, truth = _synthetic_records()
  strict = results_lib.evaluate(records, good_apd_mm=2.0)
  assert strict['good_apd_mm'] == 2.0
  assert strict['per_case']['B']['n_good'] == 2  # 1, 3, 1 mm


def test_evaluate_rejects_bad_records():
  with pytest.raises(ValueError):
    results_lib.evaluate([])
  with pytest.raises(ValueError, match='pixel_spacing'):
    results_lib.evaluate([{'case': 'A', 'frame_id': '1', 'pred_mask': np.zeros((4, 4)),
                       'expert_mask': np.zeros((4, 4))}])


def test_write_results_json_and_markdown(tmp_path):
  records, _ = _synthetic_records()
  res = results_lib.evaluate(records)
  paths = results_lib.write_results(res, str(tmp_path / 'eval'), 'scd_val')
  assert paths['json'] == str(tmp_path / 'eval' / 'scd_val.json')

  def no_nan(token):
    raise AssertionError(f'non-standard JSON constant {token}')

  with open(paths['json']) as f:
    loaded = json.load(f, parse_constant=no_nan)
  assert loaded['per_case']['C']['dice_good'] is None  # NaN written as null
  assert loaded['per_case']['B']['good_pct'] == 100.0
  assert loaded['per_set']['per_image']['n_frames'] == len(records)
  assert len(loaded['per_frame']) == len(records)

  with open(paths['markdown']) as f:
    md = f.read()
  assert 'mean ± std over cases' in md and 'per-image mean' in md
  table_rows = [line for line in md.splitlines() if line.startswith('|')]
  assert len({row.count('|') for row in table_rows[:5]}) == 1  # header, rule, 3 cases aligned
  for case in ['A', 'B', 'C']:
    assert any(row.startswith(f'| {case} |') for row in table_rows)
  row_b = next(row for row in table_rows if row.startswith('| B |'))
  cells = [cell.strip() for cell in row_b.strip('|').split('|')]
  assert cells[1] == '3' and cells[2] == '100.0' and cells[3] == '100.0'


# ----------------------------------------------------------------------------------------------
# Real SCD expert contours (skipped when the data are absent)


def test_apd_floor_of_a_perfect_mask_with_the_pipelines_rasterizer(data_root):
  """Every expert endocardium of the DICOM cases, rasterized as the pipeline does it
  (`contours.polygon_to_mask`: floored vertices, boundary included), then contoured: the
  floor every DICOM-source evaluation carries (docs/RESULTS.md, "The APD floor")."""
  config = default.get_config().data
  config.root, config.source, config.cache_dir = data_root, 'dicom', ''
  frames = data.load_frames(config)
  assert len(frames) == 96   # the 96 icontour files of the staged DICOM cases
  apd_px = []
  for frame in frames:
    mask = contours.polygon_to_mask(frame.contour, frame.shape)
    np.testing.assert_array_equal(mask, frame.mask)
    result = metrics.evaluate_frame(mask, mask, frame.pixel_spacing,
                                    expert_contour=frame.contour)
    spacing = frame.pixel_spacing[0]
    assert result['dice'] == 1.0 and result['good'] and result['apd_fallback_points'] == 0
    # Every pixel the polygon touches is in the mask and the 0.5-level contour runs half a
    # pixel beyond the centres of the boundary pixels: within one pixel of the polygon.
    assert result['apd_mm'] < spacing and result['hd95_mm'] < 1.5 * spacing
    apd_px.append(result['apd_mm'] / spacing)
  # ...and on average well away from it: a bias, not noise (0.55 px = 0.75 mm measured).
  assert np.mean(apd_px) > 0.4


def _ellipse_by_arc_length(centre, axes, n):
  """n points of an ellipse, evenly spaced in arc length, and their unit outward normals."""
  t = np.linspace(0, 2 * np.pi, 200_001)[:-1]
  (cx, cy), (a, b) = centre, axes
  dense = np.stack([cx + a * np.cos(t), cy + b * np.sin(t)], 1)
  arc = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(dense, axis=0), axis=1))])
  length = arc[-1] + np.linalg.norm(dense[0] - dense[-1])
  tt = np.interp(np.arange(n) * length / n, arc, t)
  points = np.stack([cx + a * np.cos(tt), cy + b * np.sin(tt)], 1)
  normals = np.stack([b * np.cos(tt), a * np.sin(tt)], 1)
  return points, normals / np.linalg.norm(normals, axis=1, keepdims=True)


def test_apd_equals_the_closed_form_normal_circle_intersection_on_an_ellipse():
  """An oracle where APD and the nearest-point distance differ: an ellipse against an
  off-centre circle. Each ellipse point's distance is where its exact normal meets the circle
  (the root of |p + s n - c|^2 = r^2 of smallest |s|), averaged over the points."""
  points, normals = _ellipse_by_arc_length((40.0, 40.0), (22.0, 12.0), 400)
  centre, radius = np.array([43.0, 38.0]), 17.0
  d = points - centre
  half_b = np.sum(normals * d, axis=1)
  root = np.sqrt(half_b**2 - (np.sum(d * d, axis=1) - radius**2))
  along_normal = np.minimum(np.abs(-half_b + root), np.abs(-half_b - root))
  nearest = np.abs(np.linalg.norm(d, axis=1) - radius)
  angles = np.linspace(0, 2 * np.pi, 4001)[:-1]
  expert = centre + radius * np.stack([np.cos(angles), np.sin(angles)], 1)
  got = metrics.apd_mm(points, expert, 1.0)
  # Bound: apd_mm estimates each normal from a +-2 px chord of the sampled contour; on this
  # ellipse (curvature radius >= 6.5 px) the chord's direction is off the tangent by under
  # 0.3 degrees, which moves a ~4 px distance by < 0.02 px; the 4000-gon circle is within
  # 17 (1 - cos(pi / 4000)) = 5e-6 px of the circle.
  assert abs(got - along_normal.mean()) < 0.02, (got, along_normal.mean())
  # The nearest-point distance is 0.38 px (10%) smaller here: a nearest-point APD fails above.
  assert along_normal.mean() - nearest.mean() > 0.3
  # Isotropic spacing scales every distance of the geometry exactly.
  np.testing.assert_allclose(metrics.apd_mm(points, expert, 2.0), 2 * got, rtol=1e-9)


def _published_apd_px(auto, expert, sector_deg=50.0):
  """A second APD, written from the challenge's description (Radau et al. 2009,
  compare_contours.m), not from metrics.py: the normal at each automatic point is perpendicular
  to the line through its two neighbours; among the expert points within +-50 degrees of it
  (angles about the automatic contour's centroid), the one nearest the normal line is picked;
  the distance runs to where the normal meets the line through that point's two neighbours."""
  centroid = auto.mean(axis=0)
  expert_angle = np.arctan2(expert[:, 1] - centroid[1], expert[:, 0] - centroid[0])
  out = np.empty(len(auto))
  for i, a in enumerate(auto):
    t = auto[(i + 1) % len(auto)] - auto[i - 1]
    n = np.array([-t[1], t[0]]) / np.hypot(t[0], t[1])
    angle = np.arctan2(a[1] - centroid[1], a[0] - centroid[0])
    in_sector = np.flatnonzero(
        np.abs((expert_angle - angle + np.pi) % (2 * np.pi) - np.pi) <= np.radians(sector_deg))
    rel = expert[in_sector] - a
    j = in_sector[np.argmin(np.abs(rel[:, 0] * n[1] - rel[:, 1] * n[0]))]
    p, q = expert[j - 1], expert[(j + 1) % len(expert)]
    s, _ = np.linalg.solve(np.array([n, p - q]).T, p - a)   # a + s n = p + u (q - p)
    out[i] = abs(s)
  return out


def _rotated_ellipse(centre, axes, angle, n):
  points, _ = _ellipse_by_arc_length((0.0, 0.0), axes, n)
  c, s = np.cos(angle), np.sin(angle)
  return points @ np.array([[c, s], [-s, c]]) + np.asarray(centre)


def _three_lobed(centre, n):
  th = np.linspace(0, 2 * np.pi, n + 1)[:-1]
  r = 17 + 1.5 * np.cos(3 * th + 0.3) + 1.0 * np.sin(2 * th)
  return np.stack([centre[0] + r * np.cos(th), centre[1] + r * np.sin(th)], 1)


@pytest.mark.parametrize('auto_is_ellipse', [True, False])
def test_apd_agrees_with_the_published_algorithm_on_shapes_without_symmetry(auto_is_ellipse):
  """A rotated ellipse against an off-centre three-lobed curve (and the other way round): no
  symmetry makes the normal distance equal the nearest-point distance."""
  shapes = {'ellipse': lambda n: _rotated_ellipse((41.0, 39.0), (21.0, 12.0), 0.4, n),
            'lobed': lambda n: _three_lobed((43.0, 38.0), n)}
  auto_shape, expert_shape = ('ellipse', 'lobed') if auto_is_ellipse else ('lobed', 'ellipse')
  auto, expert = shapes[auto_shape](300), shapes[expert_shape](600)
  want = _published_apd_px(auto, expert)
  got, method = metrics.perpendicular_distances_mm(auto, expert, 1.0)
  assert np.all(method == metrics.APD_NORMAL_LINE)
  # Bound: the two differ only in the normal's direction. metrics.py takes a +-2 px chord,
  # whose direction is off the tangent by at most h^2 max|dkappa/ds| / 6 = 4 * 0.013 / 6 rad
  # = 0.5 degrees on this ellipse (0.2 degrees on the lobed curve); over the <= 6 px to the
  # expert curve that moves the crossing by 6 * 0.0087 = 0.052 px. The expert lines through
  # neighbours 0.2-0.4 px apart sag from the curves by < 0.002 px.
  np.testing.assert_allclose(got, want, atol=0.055)
  assert metrics.apd_mm(auto, expert, 1.0) == pytest.approx(want.mean(), abs=0.055)
  # ...while the nearest-point distance (to a 20,000-point expert curve) is ~0.2 px smaller.
  nearest = np.linalg.norm(auto[:, None] - shapes[expert_shape](20_000)[None], axis=2).min(1)
  assert want.mean() - nearest.mean() > 0.15, (want.mean(), nearest.mean())


def _antialiased_disc(shape, cx, cy, r, k=16):
  """Pixel (row i, col j), centre (x=j, y=i): the share of the pixel inside the circle, by k x k
  supersampling (the probability a perfect model would give)."""
  offsets = (np.arange(k) + 0.5) / k - 0.5
  yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
  inside = sum(((xx + dx - cx) ** 2 + (yy + dy - cy) ** 2 <= r * r).astype(np.float64)
               for dy in offsets for dx in offsets)
  return inside / k**2


@pytest.mark.parametrize('seed', range(4))
def test_probability_contour_recovers_a_disc_below_a_pixel(seed):
  rng = np.random.default_rng(seed)
  cx, cy = rng.uniform(40, 56, 2)
  r = rng.uniform(5, 30)
  probability = _antialiased_disc((96, 96), cx, cy, r)
  contour = metrics.probability_contour(probability)
  equivalent_radius = math.sqrt(clinical.shoelace_area(contour) / math.pi)
  assert abs(equivalent_radius - r) < 0.1   # the target; measured <= 0.04 px
  # Per point: across a straight 45-degree edge the coverage is piecewise quadratic, which the
  # linear interpolation of marching squares misplaces by <= 0.05 px; curvature (r >= 5 px)
  # adds <= 1 / (8 r) = 0.025 px per pixel; measured <= 0.11 px over 12 random discs.
  np.testing.assert_allclose(np.hypot(contour[:, 0] - cx, contour[:, 1] - cy), r, atol=0.15)
  # The mask outline (pixel staircase) cannot do this: its points stray up to ~0.7 px.
  staircase = metrics.mask_to_contour(probability >= 0.5)
  assert np.abs(np.hypot(staircase[:, 0] - cx, staircase[:, 1] - cy) - r).max() > 0.3


def test_probability_contour_follows_the_given_component_only():
  probability = _antialiased_disc((64, 64), 20.0, 20.0, 8.0)
  probability += _antialiased_disc((64, 64), 46.0, 44.0, 12.0)
  small = metrics.probability_contour(probability, mask=metrics.largest_component(
      probability * (np.arange(64)[None, :] < 32) >= 0.5))
  assert np.all(small[:, 0] < 30)
  large = metrics.probability_contour(probability)   # default: the largest component
  assert np.all(large[:, 0] > 32)
  assert len(metrics.probability_contour(np.zeros((8, 8)))) == 0
