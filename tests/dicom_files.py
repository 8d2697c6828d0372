# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""DICOM files for the tests, written with pydicom with the tags scanners write."""

import io
import os

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    BasicTextSRStorage,
    ComputedRadiographyImageStorage,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

__all__ = ["make_dicom", "make_dicom_study"]


def make_dicom(
    path,
    pixels=None,
    photometric="MONOCHROME2",
    modality="CR",
    slope=None,
    intercept=None,
    jpeg=False,
    sop_class=ComputedRadiographyImageStorage,
):
    """A DICOM file as scanners write them: 12 bits stored in 16 (or JPEG baseline 8-bit, as RSNA's); ``pixels``
    None gives an image object without pixel data; ``sop_class`` BasicTextSRStorage a structured report."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID = os.path.basename(str(path)).split(".")[0]
    if modality is not None:
        ds.Modality = modality
    if sop_class != BasicTextSRStorage:
        ds.Rows, ds.Columns = (40, 48) if pixels is None else pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, photometric, 0
        if slope is not None:
            ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        if jpeg:
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        else:
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        if pixels is not None and jpeg:
            buf = io.BytesIO()
            Image.fromarray(pixels.astype(np.uint8)).save(buf, format="JPEG", quality=95)
            ds.PixelData = encapsulate([buf.getvalue()])
            ds["PixelData"].VR = "OB"
        elif pixels is not None:
            ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return str(path)


def make_dicom_study(path, pixels, pixel_spacing=None, position=None, modality="CR", sop_class=None):
    """A DICOM image as a PACS holds it (:func:`make_dicom` plus patient, study and series: what DICOM SEG and SR
    copy and reference). ``pixel_spacing`` (row, column spacing in mm) adds PixelSpacing; ``position`` (x, y, z in
    mm) adds a frame of reference with ImagePositionPatient and an axial ImageOrientationPatient (as CT and MR have).
    """
    import pydicom

    kwargs = {} if sop_class is None else {"sop_class": sop_class}
    make_dicom(path, pixels, modality=modality, **kwargs)
    ds = pydicom.dcmread(str(path))
    ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "Test^Patient", "20200101", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "ACC1", ""
    ds.StudyDate, ds.StudyTime, ds.SeriesNumber, ds.InstanceNumber = "20240102", "101500", 3, 1
    if pixel_spacing is not None:
        ds.PixelSpacing = [float(s) for s in pixel_spacing]
    if position is not None:
        ds.FrameOfReferenceUID = generate_uid()
        ds.ImagePositionPatient = [float(p) for p in position]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.SliceThickness = 1.0
    ds.save_as(str(path), enforce_file_format=True)
    return str(path)
