"""DICOM Segmentation objects (SEG) of predicted label maps, with highdicom.

One SEG per cardiac phase references that phase's source images (one frame per slice), so
PACS viewers (3D Slicer, OHIF) show it over the cine. Segments: 1 LV cavity (SCT 87878005 Left
ventricle, the structure CID 7152 lists for cardiac segmentation) and, for a three-class model,
2 LV myocardium (SCT 49848007).

highdicom (the reference implementation of the DICOM SEG IOD in Python) builds and validates
the object; writing one by hand with pydicom would mean restating the IOD's modules.
"""

import warnings
from typing import Sequence

import numpy as np
import pydicom
from pydicom import valuerep

SEGMENTS = ((1, 'LV cavity', 'LeftVentricle'), (2, 'LV myocardium', 'LeftVentricleMyocardium'))
_DATES = {'DA': valuerep.DA, 'TM': valuerep.TM, 'DT': valuerep.DT}


def _conform(source: pydicom.Dataset, frame_of_reference: str) -> list[str]:
  """Fixes, on the in-memory copy, what the SEG IOD cannot take from anonymized sources:
  unparsable dates and times (blanked) and per-image Frames of Reference (the first image's).
  Returns what was changed."""
  changed = []
  for element in source:
    if element.VR in _DATES and element.value:
      try:
        _DATES[element.VR](element.value)
      except ValueError:
        changed.append(f'{element.keyword} {element.value!r} blanked')
        element.value = ''
  if source.get('FrameOfReferenceUID', frame_of_reference) != frame_of_reference:
    source.FrameOfReferenceUID = frame_of_reference
    changed.append('FrameOfReferenceUID')
  return changed


def write_dicom_seg(path: str, source_files: Sequence[str], labels: Sequence[np.ndarray],
                    num_classes: int, series_uid: str, instance_number: int,
                    model_name: str, version: str) -> list[str]:
  """Writes one binary SEG of `labels` (one (H, W) label map per source image: 0 background,
  1 cavity, 2 myocardium) and returns the notes on source attributes it had to fix.

  Args:
    path: the .dcm file to write.
    source_files: the DICOM images the label maps belong to (one series).
    labels: label maps in the order of `source_files`.
    num_classes: 2 (cavity) or 3 (+ myocardium): which segments the SEG describes.
    series_uid: the SEG series (shared by the phases of one cine).
    instance_number: this SEG's number within that series.
    model_name, version: the algorithm identification.
  """
  import highdicom as hd  # pylint: disable=g-import-not-at-top  # only when SEG is asked for
  from pydicom.sr.codedict import codes  # pylint: disable=g-import-not-at-top

  with warnings.catch_warnings():
    # Anonymized sources carry UIDs and names pydicom warns about, once per file.
    warnings.simplefilter('ignore', UserWarning)
    sources = [pydicom.dcmread(f) for f in source_files]
    notes = set()
    for source in sources:
      notes.update(_conform(source, sources[0].get('FrameOfReferenceUID', '')))
    algorithm = hd.AlgorithmIdentificationSequence(
        name='lvseg-jax', version=version, family=codes.DCM.ArtificialIntelligence,
        source=model_name)
    descriptions = [hd.seg.SegmentDescription(
        segment_number=number, segment_label=label,
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=getattr(codes.SCT, code),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm) for number, label, code in SEGMENTS[:num_classes - 1]]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=np.stack([np.asarray(a, np.uint8) for a in labels]),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=series_uid, series_number=900,
        sop_instance_uid=hd.UID(), instance_number=instance_number, manufacturer='lvseg-jax',
        manufacturer_model_name=model_name, software_versions=version,
        device_serial_number='none', series_description='lvseg-jax LV segmentation',
        omit_empty_frames=False)
    seg.save_as(path)
  return sorted(notes)
