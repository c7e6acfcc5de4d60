"""Inputs built to break the image loader, shared by the loader's tests and benchmarks/fault_drill.py:
a valid DICOM whose patient tags hold values no other data contains, and the malformed variants that made
pydicom quote those bytes in its warnings and exceptions."""

from __future__ import annotations

import io
import struct

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

PATIENT = {"PatientName": "Zyxwvut^Quorra", "PatientID": "PID-8675309-QX", "PatientBirthDate": "19470321",
           "InstitutionName": "Sankt Quux Klinikum"}


def patient_dicom() -> bytes:
    """A valid 4x4 DICOM whose patient tags hold values no other test data contains."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    for tag, value in PATIENT.items():
        setattr(ds, tag, value)
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, "1.2.3.4"
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = bytes(range(16))
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def with_length(data: bytes, element: bytes, length: int) -> bytes:
    """``data`` with the 2-byte value length of an explicit-VR element (tag + VR bytes) replaced."""
    at = data.index(element) + len(element)
    return data[:at] + struct.pack("<H", length) + data[at + 2:]


def malformed_dicoms() -> dict[str, bytes]:
    good = patient_dicom()
    transfer_syntax = b"\x02\x00\x10\x00UI"  # (0002,0010) TransferSyntaxUID
    rest = len(good) - good.index(transfer_syntax) - 8
    rows = good.index(b"\x28\x00\x10\x00US")  # (0028,0010) Rows
    return {
        # the value swallows the whole dataset: pydicom warns "Invalid value for VR UI: '...'" with all of it
        "transfer syntax swallows the dataset": with_length(good, transfer_syntax, rest),
        "transfer syntax swallows 212 bytes": with_length(good, transfer_syntax, 212),
        # an odd-length US value holding patient text: BytesLengthException, which quotes the bytes
        "Rows holds 13 bytes": good[:rows] + b"\x28\x00\x10\x00US" + struct.pack("<H", 13)
        + PATIENT["PatientID"][:13].encode() + good[rows + 10:],
        "cut inside the meta group length": good[:141],
        "pixel data shorter than declared": good[:-6],
    }
