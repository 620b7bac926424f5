"""Segmentation metrics as the 2009 Sunnybrook LV challenge evaluated them.

Reference: Radau et al. 2009, "Evaluation Framework for Algorithms Segmenting Short Axis Cardiac
MRI", and their MATLAB evaluator compare_contours.m v1.0. Everything runs on host in NumPy/SciPy
at the original image resolution.

Conventions (docs/ARCHITECTURE.md): contours are `(P, 2)` float arrays of `(x, y)` pixel
coordinates (x = column, y = row), implicitly closed; a repeated closing point is allowed. Pixel
spacing is `(row, col)` in mm. Masks are `(H, W)` arrays; any nonzero value is foreground.

Per frame:
  * `dice`: on the masks as given (no post-processing). Both empty -> 1.0.
  * `apd_mm`: average perpendicular distance of the challenge, from the automatic contour (the
    outer boundary of the largest connected component of the prediction) to the expert contour.
    Coordinates are scaled to mm per axis before any geometry, so anisotropic spacing is exact.
  * `mcd_mm`: symmetric mean contour distance, `(mean d(A->B) + mean d(B->A)) / 2`, with
    point-to-polyline distances sampled uniformly along each contour (0.05 px steps), so the value
    does not depend on how densely either contour is sampled.
  * `hd95_mm`: 95th-percentile Hausdorff distance, `max(p95 d(A->B), p95 d(B->A))` (the
    "robust Hausdorff" of DeepMind's surface-distance package), same sampling as `mcd_mm`.
  * `detected`: the prediction is non-empty. `good`: detected and `apd_mm < good_apd_mm` (5 mm).

Aggregates over cases and sets, and the results files: `lvseg_jax.results`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy import ndimage
from skimage import measure

from lvseg_jax import contours as contours_lib

GOOD_APD_MM = 5.0
# Half-width (arc length) of the tangent chord. Mask contours are pixel staircases: 2 px spans a
# step pattern, while a symmetric chord stays exact on circles of any radius.
TANGENT_WINDOW_PX = 2.0

# How a point's APD distance was obtained (see `perpendicular_distances_mm`).
APD_NORMAL_LINE = 0     # normal ∩ line through the nearest expert point and its neighbours
APD_NORMAL_POLYLINE = 1  # fallback: normal ∩ expert polyline
APD_NEAREST = 2         # fallback: Euclidean distance to the expert polyline

# The challenge accepted an intersection only within 1.5 px of the expert contour.
_MAX_INTERSECTION_OFFSET_PX = 1.5
# Without a crossing, expert points this close to the normal count as tied (challenge: 0.5 px).
_TIE_PX = 0.5
_RESAMPLE_STEP_PX = 0.05
_PAIR_CHUNK = 65_536  # points x segments evaluated at once: bounds memory, stays in cache
_EPS = 1e-9



# ----------------------------------------------------------------------------------------------
# Input normalisation


def _as_mask(mask: np.ndarray, name: str = 'mask') -> np.ndarray:
  m = np.asarray(mask)
  if m.ndim != 2:
    raise ValueError(f'{name} must be 2D (H, W), got shape {m.shape}')
  return m != 0


def _as_contour(contour: np.ndarray | None, name: str = 'contour') -> np.ndarray:
  if contour is None:
    return np.zeros((0, 2))
  c = np.asarray(contour, dtype=np.float64)
  if c.size == 0:
    return np.zeros((0, 2))
  if c.ndim != 2 or c.shape[1] != 2:
    raise ValueError(f'{name} must have shape (P, 2) of (x, y), got {c.shape}')
  if not np.all(np.isfinite(c)):
    raise ValueError(f'{name} has non-finite coordinates')
  return c


def _to_mm(contour: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
  # x is a column coordinate and y a row coordinate, hence (col, row) spacing.
  return contour * np.array([spacing[1], spacing[0]])


def _dedupe_closed(c: np.ndarray, tol: float = _EPS) -> np.ndarray:
  """Drops consecutive duplicates, cyclically (so also a repeated closing point)."""
  if len(c) <= 1:
    return c
  keep = np.linalg.norm(c - np.roll(c, 1, axis=0), axis=1) > tol
  if not keep.any():
    return c[:1]
  return c[keep]


# ----------------------------------------------------------------------------------------------
# Masks and contours


def dice(pred: np.ndarray, target: np.ndarray) -> float:
  """Dice coefficient 2|P∩T| / (|P| + |T|) of two binary masks.

  Args:
    pred: (H, W) mask; nonzero is foreground.
    target: (H, W) mask of the same shape.

  Returns:
    Dice in [0, 1]; 1.0 when both masks are empty (perfect agreement on "nothing there").
  """
  p, t = _as_mask(pred, 'pred'), _as_mask(target, 'target')
  if p.shape != t.shape:
    raise ValueError(f'shape mismatch: pred {p.shape} vs target {t.shape}')
  total = int(p.sum()) + int(t.sum())
  if total == 0:
    return 1.0
  return 2.0 * int(np.logical_and(p, t).sum()) / total


def largest_component(mask: np.ndarray) -> np.ndarray:
  """Largest 4-connected foreground component of a mask, as a bool mask (ties: lowest label)."""
  m = _as_mask(mask)
  labels, n = ndimage.label(m)  # default structure = 4-connectivity
  if n == 0:
    return np.zeros(m.shape, dtype=bool)
  sizes = np.bincount(labels.ravel())[1:]
  return labels == int(np.argmax(sizes)) + 1


def mask_to_contour(mask: np.ndarray) -> np.ndarray:
  """Closed outer contour of the largest connected component of a mask.

  Marching squares at level 0.5 (skimage.measure.find_contours on the zero-padded component):
  the contour runs midway between inside and outside pixel centres. Expert masks are rasterized
  with every pixel the expert polygon touches (`contours.polygon_to_mask`), so this contour
  runs on average 0.55 px outside that polygon (the APD floor in docs/RESULTS.md). Holes are
  ignored (outer boundary only), like the expert's simple closed polygon. Foreground is
  4-connected, which is what find_contours(fully_connected='low') traces.

  Args:
    mask: (H, W) mask; nonzero is foreground.

  Returns:
    (P, 2) float64 (x, y) pixel coordinates without a repeated closing point; (0, 2) if empty.
  """
  comp = largest_component(mask)
  return _outer_level_contour(comp.astype(np.float64), comp)


def probability_contour(probability: np.ndarray, mask: np.ndarray | None = None,
                        level: float = 0.5) -> np.ndarray:
  """Sub-pixel contour: the `level` isoline of a probability map around one component.

  Marching squares interpolates where the probability crosses `level` between pixel centres,
  so the outline is not tied to the pixel grid. The isoline is taken around the largest
  component of `mask` (default: probability >= level), within one pixel of it, so other
  blobs are ignored as in `mask_to_contour`.

  Args:
    probability: (H, W) float in [0, 1].
    mask: (H, W) the segmented region (e.g. after post-processing), or None.
    level: the isoline.

  Returns:
    (P, 2) float64 (x, y) pixel coordinates; (0, 2) if the region is empty.
  """
  probability = np.asarray(probability, np.float64)
  comp = largest_component(probability >= level if mask is None else mask)
  near = ndimage.binary_dilation(comp, structure=np.ones((3, 3), bool))
  return _outer_level_contour(np.where(near, probability, 0.0), comp, level)


def _outer_level_contour(field: np.ndarray, comp: np.ndarray, level: float = 0.5
                         ) -> np.ndarray:
  """Outer `level` isoline of `field` around the bool component `comp`, as (x, y)."""
  if not comp.any():
    return np.zeros((0, 2))
  rows, cols = ndimage.find_objects(comp.astype(np.int8))[0]
  # Crop (one pixel of margin) for speed, pad so the contour closes even at the image border.
  r0, c0 = max(rows.start - 1, 0), max(cols.start - 1, 0)
  crop = np.pad(field[r0:rows.stop + 1, c0:cols.stop + 1], 1)
  outlines = measure.find_contours(crop, level, fully_connected='low')
  if not outlines:   # `field` never reaches `level` on the component: its pixel outline
    return mask_to_contour(comp)
  outer = max(outlines, key=lambda c: abs(contours_lib.signed_area(c)))
  if len(outer) > 1 and np.array_equal(outer[0], outer[-1]):
    outer = outer[:-1]
  return (outer + np.array([r0 - 1, c0 - 1], dtype=np.float64))[:, ::-1].copy()


# ----------------------------------------------------------------------------------------------
# Geometry helpers (all in mm)


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
  return u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]


def _point_to_polyline(points: np.ndarray, poly: np.ndarray) -> np.ndarray:
  """Distance from each point to a closed polyline (exact, point-to-segment)."""
  if len(poly) == 1:
    return np.linalg.norm(points - poly[0], axis=1)
  ax, ay = poly[:, 0], poly[:, 1]
  abx, aby = np.roll(ax, -1) - ax, np.roll(ay, -1) - ay
  ab2 = abx * abx + aby * aby
  # Zero-length segments get t = 0, i.e. the distance to their start point.
  inv_ab2 = np.where(ab2 > 0, 1.0 / np.where(ab2 > 0, ab2, 1.0), 0.0)
  out = np.empty(len(points))
  chunk = max(1, _PAIR_CHUNK // len(poly))
  for i in range(0, len(points), chunk):
    px = points[i:i + chunk, 0:1] - ax
    py = points[i:i + chunk, 1:2] - ay
    t = np.clip((px * abx + py * aby) * inv_ab2, 0.0, 1.0)
    px -= t * abx
    py -= t * aby
    out[i:i + chunk] = np.sqrt((px * px + py * py).min(axis=1))
  return out


def _resample_closed(poly: np.ndarray, step: float) -> np.ndarray:
  """Points at uniform arc-length spacing (<= step) along a closed polyline."""
  if len(poly) == 1:
    return poly.copy()
  seg = np.roll(poly, -1, axis=0) - poly
  lengths = np.linalg.norm(seg, axis=1)
  cum = np.concatenate([[0.0], np.cumsum(lengths)])
  n = max(int(math.ceil(cum[-1] / step)), len(poly))
  s = (np.arange(n) + 0.5) * (cum[-1] / n)  # cell midpoints: each sample stands for 1/n of L
  idx = np.clip(np.searchsorted(cum, s, side='right') - 1, 0, len(poly) - 1)
  frac = (s - cum[idx]) / np.where(lengths[idx] > 0, lengths[idx], 1.0)
  return poly[idx] + frac[:, None] * seg[idx]


def _tangents(c: np.ndarray, window: float) -> np.ndarray:
  """Unit tangents of a closed contour: chord between the points `window` before and after.

  The two points are interpolated along the polyline at +-window arc length, so for sparse
  contours (point spacing > window) the tangent bisects the two adjacent segments, and for dense
  staircase contours from masks it is not quantized to 0/45/90 degrees.
  """
  seg = np.roll(c, -1, axis=0) - c
  lengths = np.linalg.norm(seg, axis=1)
  cum = np.concatenate([[0.0], np.cumsum(lengths)])
  total = cum[-1]
  h = min(window, 0.25 * total)  # tiny contours: keep both points on the near side

  def at(s: np.ndarray) -> np.ndarray:
    s = np.mod(s, total)
    idx = np.clip(np.searchsorted(cum, s, side='right') - 1, 0, len(c) - 1)
    frac = (s - cum[idx]) / np.where(lengths[idx] > 0, lengths[idx], 1.0)
    return c[idx] + frac[:, None] * seg[idx]

  t = at(cum[:-1] + h) - at(cum[:-1] - h)
  flat = np.linalg.norm(t, axis=1) <= _EPS
  t[flat] = seg[flat]
  return t / np.linalg.norm(t, axis=1, keepdims=True)


# ----------------------------------------------------------------------------------------------
# Contour distances


def perpendicular_distances_mm(
    auto_contour: np.ndarray, expert_contour: np.ndarray,
    pixel_spacing: float | Sequence[float], *, tangent_window_px: float = TANGENT_WINDOW_PX
) -> tuple[np.ndarray, np.ndarray]:
  """Per-point perpendicular distances from the automatic to the expert contour (challenge APD).

  For each automatic point a (consecutive duplicates removed) the normal line passes through a,
  perpendicular to the tangent. The normal crosses the expert polyline in one or more places; the
  crossing nearest to a picks the expert segment, and the segment end nearest to the normal line
  is "the expert point nearest to the normal" (compare_contours.m instead searched a +-50 degree
  sector around the centroid, which serves the same purpose: not the far side of the contour).
  The expert line goes through that point along the expert tangent there (the direction of its
  neighbours). The distance is |a - X| with X the intersection of the normal and the expert line.

  Tangents (both contours) are the chord between the points `tangent_window_px` before and after
  along the contour (interpolated). compare_contours.m fitted a least-squares line to the point
  and its two neighbours; on its smooth, sub-pixel contours that is the same direction, but the
  marching-squares contours of masks are staircases whose neighbour chords are quantized to
  multiples of ~20-45 degrees; on rasterized concentric disks that biased APD upward by ~0.15 px
  at 5 px gaps and up to ~1.5 px at 20-30 px gaps (2 px window: < 0.1 px and < 0.35 px). For a
  circle any symmetric window gives the exact radial normal.

  Robustness, where compare_contours.m would drop the point (distance -999): if the lines are
  parallel or X lies more than 1.5 px from the expert polyline, the distance to the nearest
  crossing of the normal with the expert polyline is used (APD_NORMAL_POLYLINE); if the normal
  misses the expert contour entirely, the expert point nearest the normal (ties within 0.5 px:
  nearest to a) gives the line, and failing validation the plain distance to the expert polyline
  is used (APD_NEAREST). Coordinates are scaled to mm per axis first.

  Args:
    auto_contour: (P, 2) (x, y) automatic contour, pixels.
    expert_contour: (Q, 2) (x, y) expert contour, pixels.
    pixel_spacing: (row, col) mm, or one number for isotropic pixels.
    tangent_window_px: half-width (arc length, pixels) of the tangent chord.

  Returns:
    (distances_mm, method) of shape (P',) each, P' = points after removing duplicates; method
    holds APD_NORMAL_LINE / APD_NORMAL_POLYLINE / APD_NEAREST per point. Empty if either contour
    is empty.
  """
  spacing = contours_lib.as_spacing(pixel_spacing)
  px = 0.5 * (spacing[0] + spacing[1])  # mm per pixel, for the pixel-based tolerances
  a = _dedupe_closed(_to_mm(_as_contour(auto_contour, 'auto_contour'), spacing))
  e = _dedupe_closed(_to_mm(_as_contour(expert_contour, 'expert_contour'), spacing))
  if len(a) == 0 or len(e) == 0:
    return np.zeros(0), np.zeros(0, dtype=np.int8)
  if len(a) == 1 or len(e) == 1:
    # No tangent (single auto point) or no expert line: distance is all that is defined.
    return _point_to_polyline(a, e), np.full(len(a), APD_NEAREST, dtype=np.int8)

  tan = _tangents(a, tangent_window_px * px)
  nrm = np.stack([-tan[:, 1], tan[:, 0]], axis=1)
  q_idx = np.empty(len(a), dtype=np.int64)
  s_cross = np.full(len(a), np.nan)
  chunk = max(1, _PAIR_CHUNK // len(e))
  for i in range(0, len(a), chunk):
    sl = slice(i, i + chunk)
    rel = e[None] - a[sl, None, :]
    perp = np.einsum('pqk,pk->pq', rel, tan[sl])    # signed offset of expert points from normal
    along = np.einsum('pqk,pk->pq', rel, nrm[sl])   # position along the normal
    perp1, along1 = np.roll(perp, -1, axis=1), np.roll(along, -1, axis=1)
    crosses = perp * perp1 <= 0
    denom = perp - perp1
    on_line = denom == 0  # only reachable with crosses when both ends lie on the normal
    u = np.where(on_line, 0.0, perp / np.where(on_line, 1.0, denom))
    s = along + u * (along1 - along)
    # A segment lying on the normal: its nearest point to a (0 if it contains a).
    s_on = np.where(along * along1 <= 0, 0.0,
                    np.where(np.abs(along) <= np.abs(along1), along, along1))
    s = np.where(on_line, s_on, s)
    s_abs = np.where(crosses, np.abs(s), np.inf)
    j = np.argmin(s_abs, axis=1)
    rows = np.arange(len(j))
    has = np.isfinite(s_abs[rows, j])
    s_cross[sl] = np.where(has, s[rows, j], np.nan)
    j1 = (j + 1) % len(e)
    # Segment end nearest the normal; a tie (segment lying on the normal) goes to the end
    # nearest the crossing, not to the far end.
    p0, p1 = np.abs(perp[rows, j]), np.abs(perp[rows, j1])
    s_j = s[rows, j]
    nearer0 = np.abs(along[rows, j] - s_j) <= np.abs(along1[rows, j] - s_j)
    q_cross = np.where(p0 < p1, j, np.where(p0 > p1, j1, np.where(nearer0, j, j1)))
    # No crossing: nearest-to-normal expert point, ties broken by distance to a.
    aperp = np.abs(perp)
    tied = aperp <= aperp.min(axis=1, keepdims=True) + _TIE_PX * px
    d2_tied = np.where(tied, np.einsum('pqk,pqk->pq', rel, rel), np.inf)
    q_idx[sl] = np.where(has, q_cross, np.argmin(d2_tied, axis=1))

  q = e[q_idx]
  d = _tangents(e, tangent_window_px * px)[q_idx]
  den = _cross(nrm, d)
  ok = np.abs(den) > 1e-6 * np.linalg.norm(d, axis=1)
  s_line = _cross(q - a, d) / np.where(ok, den, 1.0)
  x = a + s_line[:, None] * nrm
  ok &= _point_to_polyline(x, e) <= _MAX_INTERSECTION_OFFSET_PX * px

  dist = np.abs(s_line)
  method = np.full(len(a), APD_NORMAL_LINE, dtype=np.int8)
  use_poly = ~ok & np.isfinite(s_cross)
  dist[use_poly] = np.abs(s_cross[use_poly])
  method[use_poly] = APD_NORMAL_POLYLINE
  use_near = ~ok & ~np.isfinite(s_cross)
  if use_near.any():
    dist[use_near] = _point_to_polyline(a[use_near], e)
    method[use_near] = APD_NEAREST
  return dist, method


def apd_mm(auto_contour: np.ndarray, expert_contour: np.ndarray,
           pixel_spacing: float | Sequence[float], *, exclude_fallbacks: bool = False,
           tangent_window_px: float = TANGENT_WINDOW_PX) -> float:
  """Average perpendicular distance (mm) from the automatic to the expert contour.

  The challenge metric (see `perpendicular_distances_mm` for the per-point rule), averaged over
  all automatic contour points. A mask's outline is not the polygon it was rasterized from:
  the outline of the expert's own mask (`contours.polygon_to_mask`) lies on average 0.55 px
  (0.75 mm, HD95 1.39 mm) from the expert polygon on the 96 SCD DICOM contours, a floor that
  every evaluation of masks against polygons carries (docs/RESULTS.md, "The APD floor").

  Args:
    auto_contour: (P, 2) (x, y) automatic contour, pixels.
    expert_contour: (Q, 2) (x, y) expert contour, pixels.
    pixel_spacing: (row, col) mm, or one number.
    exclude_fallbacks: average only the points whose normal met the fitted expert line, as
      compare_contours.m did (it dropped the others); NaN if there are none.
    tangent_window_px: half-width (arc length, pixels) of the tangent chord.

  Returns:
    APD in mm; NaN if either contour is empty.
  """
  dist, method = perpendicular_distances_mm(auto_contour, expert_contour, pixel_spacing,
                                            tangent_window_px=tangent_window_px)
  if exclude_fallbacks:
    dist = dist[method == APD_NORMAL_LINE]
  return float(dist.mean()) if dist.size else math.nan


def _directed_distances_mm(a: np.ndarray, b: np.ndarray, spacing: tuple[float, float]
                           ) -> tuple[np.ndarray, np.ndarray] | None:
  a = _dedupe_closed(_to_mm(_as_contour(a, 'a'), spacing))
  b = _dedupe_closed(_to_mm(_as_contour(b, 'b'), spacing))
  if len(a) == 0 or len(b) == 0:
    return None
  step = _RESAMPLE_STEP_PX * min(spacing)
  return (_point_to_polyline(_resample_closed(a, step), b),
          _point_to_polyline(_resample_closed(b, step), a))


def _mcd_hd95(a: np.ndarray, b: np.ndarray, spacing: tuple[float, float]) -> tuple[float, float]:
  dd = _directed_distances_mm(a, b, spacing)
  if dd is None:
    return math.nan, math.nan
  d_ab, d_ba = dd
  mcd = 0.5 * (float(d_ab.mean()) + float(d_ba.mean()))
  hd95 = max(float(np.percentile(d_ab, 95)), float(np.percentile(d_ba, 95)))
  return mcd, hd95


def mean_contour_distance_mm(a: np.ndarray, b: np.ndarray,
                             pixel_spacing: float | Sequence[float]) -> float:
  """Symmetric mean contour distance (mm): mean of the two directed mean distances.

  Each directed distance is from points sampled every 0.05 px along one closed contour to the
  other contour polyline. NaN if either contour is empty.
  """
  return _mcd_hd95(a, b, contours_lib.as_spacing(pixel_spacing))[0]


def hausdorff95_mm(a: np.ndarray, b: np.ndarray, pixel_spacing: float | Sequence[float]) -> float:
  """95th-percentile Hausdorff distance (mm): max of the two directed 95th percentiles.

  Same sampling as `mean_contour_distance_mm`; percentiles use NumPy's linear interpolation.
  NaN if either contour is empty.
  """
  return _mcd_hd95(a, b, contours_lib.as_spacing(pixel_spacing))[1]


# ----------------------------------------------------------------------------------------------
# Frames, cases, sets


def evaluate_frame(pred_mask: np.ndarray, expert_mask: np.ndarray,
                   pixel_spacing: float | Sequence[float], expert_contour: np.ndarray | None = None,
                   spacing_source: str = 'dicom', good_apd_mm: float = GOOD_APD_MM,
                   auto_contour: np.ndarray | None = None) -> dict[str, Any]:
  """All per-frame metrics of one frame at its original resolution.

  Args:
    pred_mask: (H, W) predicted mask.
    expert_mask: (H, W) expert mask (rasterized expert polygon).
    pixel_spacing: (row, col) mm.
    expert_contour: (Q, 2) (x, y) expert polygon; used as the expert contour when given and
      non-empty (the challenge compared against the polygon), else the contour of `expert_mask`
      (`mask_to_contour`) is used.
    spacing_source: where the spacing came from ('dicom' | 'table' | 'nominal'); recorded.
    good_apd_mm: APD threshold of a good contour.
    auto_contour: (P, 2) (x, y) automatic contour (e.g. predict's sub-pixel contour); default
      the outline of `pred_mask` (`mask_to_contour`).

  Returns:
    dict with dice, apd_mm, mcd_mm, hd95_mm (NaN when undefined), detected, good,
    pixel_spacing_mm, spacing_source, expert_contour_from ('polygon' | 'mask'),
    n_auto_points and apd_fallback_points (points that needed an APD fallback).
  """
  spacing = contours_lib.as_spacing(pixel_spacing)
  pred, expert = _as_mask(pred_mask, 'pred_mask'), _as_mask(expert_mask, 'expert_mask')
  if pred.shape != expert.shape:
    raise ValueError(f'shape mismatch: pred_mask {pred.shape} vs expert_mask {expert.shape}')
  expert_c = _as_contour(expert_contour, 'expert_contour')
  from_polygon = len(expert_c) > 0
  if not from_polygon:
    expert_c = mask_to_contour(expert)
  auto_c = mask_to_contour(pred) if auto_contour is None else _as_contour(auto_contour,
                                                                          'auto_contour')
  detected = bool(pred.any())

  dist, method = perpendicular_distances_mm(auto_c, expert_c, spacing)
  apd = float(dist.mean()) if dist.size else math.nan
  mcd, hd95 = _mcd_hd95(auto_c, expert_c, spacing)
  return {
      'dice': dice(pred, expert),
      'apd_mm': apd,
      'mcd_mm': mcd,
      'hd95_mm': hd95,
      'detected': detected,
      'good': bool(detected and apd < good_apd_mm),  # NaN compares False
      'pixel_spacing_mm': [spacing[0], spacing[1]],
      'spacing_source': str(spacing_source),
      'expert_contour_from': 'polygon' if from_polygon else 'mask',
      'n_auto_points': int(dist.size),
      'apd_fallback_points': int(np.count_nonzero(method != APD_NORMAL_LINE)),
  }
