"""Which compressed video packets no other frame references, read from NAL headers.

A frame nothing references can be left out of the decoder without changing any
other frame; the decoder then skips its work (worker/video.py skips the ones the
clip sampling does not use). Only what the headers state for certain counts:
whenever a packet cannot be read, or the codec is not H.264/HEVC, the answer is
"unknown" and the packet is decoded.

H.264 (ITU-T H.264 7.4.1): a slice NAL (types 1, 5) with ``nal_ref_idc == 0``
belongs to a picture no other picture references.

HEVC (ITU-T H.265 7.4.2.2): VCL NAL types 0, 2, 4, ..., 14 (TRAIL_N, TSA_N, STSA_N,
RADL_N, RASL_N, RSV_VCL_N10/12/14) mark a *sub-layer* non-reference picture:
pictures of higher temporal sub-layers may still reference it. It is skippable
only in the highest sub-layer the stream has (``sps_max_sub_layers_minus1``).

Framing: MP4/Matroska store NAL units behind a 1-4 byte length (its size is in
the avcC/hvcC extradata); MPEG-TS and raw streams use Annex B start codes.
"""

from __future__ import annotations

from collections.abc import Iterator

H264_SLICE_TYPES = (1, 5)
HEVC_NON_REFERENCE_TYPES = frozenset({0, 2, 4, 6, 8, 10, 12, 14})
HEVC_SPS = 33
HEVC_VCL_END = 32  # VCL NAL unit types are 0..31


def _annexb_units(data: bytes | memoryview) -> Iterator[memoryview]:
    view = memoryview(data)
    raw = bytes(view) if not isinstance(data, bytes) else data
    starts = []
    i = raw.find(b"\x00\x00\x01")
    while i >= 0:
        starts.append(i + 3)
        i = raw.find(b"\x00\x00\x01", i + 3)
    for n, start in enumerate(starts):
        end = starts[n + 1] - 3 if n + 1 < len(starts) else len(raw)
        yield view[start:end]


def _length_prefixed_units(data: memoryview, length_size: int) -> Iterator[memoryview] | None:
    units = []
    pos, size = 0, len(data)
    while pos < size:
        if pos + length_size > size:
            return None
        length = int.from_bytes(data[pos : pos + length_size], "big")
        pos += length_size
        if length == 0 or pos + length > size:
            return None
        units.append(data[pos : pos + length])
        pos += length
    return iter(units)


class ReferenceReader:
    """Reads "is this packet's picture a reference?" for one H.264 or HEVC stream.

    ``is_reference`` answers True, False, or None (cannot tell: decode it).
    """

    def __init__(self, *, codec: str, extradata: bytes | None) -> None:
        self.codec = codec if codec in ("h264", "hevc") else ""
        self.length_size = 0  # 0: Annex B start codes
        self.max_temporal_id: int | None = None
        extradata = extradata or b""
        if self.codec == "h264" and len(extradata) >= 7 and extradata[0] == 1:
            self.length_size = (extradata[4] & 3) + 1
        elif self.codec == "hevc" and len(extradata) >= 23 and extradata[0] == 1:
            self.length_size = (extradata[21] & 3) + 1
            self._read_hvcc_sps(extradata)
        elif self.codec == "hevc":
            for unit in _annexb_units(extradata):
                self._note_hevc_unit(unit)
        if self.length_size == 3:  # not a valid NAL length size: do not guess
            self.codec = ""

    @property
    def readable(self) -> bool:
        return bool(self.codec)

    def _read_hvcc_sps(self, extradata: bytes) -> None:
        pos, count = 23, extradata[22]
        for _ in range(count):
            if pos + 3 > len(extradata):
                return
            nal_type = extradata[pos] & 0x3F
            units = int.from_bytes(extradata[pos + 1 : pos + 3], "big")
            pos += 3
            for _ in range(units):
                length = int.from_bytes(extradata[pos : pos + 2], "big")
                unit = memoryview(extradata)[pos + 2 : pos + 2 + length]
                if nal_type == HEVC_SPS:
                    self._note_hevc_unit(unit)
                pos += 2 + length

    def _note_hevc_unit(self, unit: memoryview) -> None:
        # SPS payload after the 2-byte NAL header: vps_id u(4), max_sub_layers_minus1 u(3).
        if len(unit) >= 3 and (unit[0] >> 1) & 0x3F == HEVC_SPS:
            sub_layers = (unit[2] >> 1) & 0x7
            self.max_temporal_id = max(self.max_temporal_id or 0, sub_layers)

    def _units(self, data: memoryview) -> Iterator[memoryview] | None:
        if self.length_size:
            return _length_prefixed_units(data, self.length_size)
        return _annexb_units(data)

    def is_reference(self, data: bytes | memoryview) -> bool | None:
        if not self.codec:
            return None
        units = self._units(memoryview(data))
        if units is None:
            return None
        if self.codec == "h264":
            return self._h264(units)
        return self._hevc(units)

    @staticmethod
    def _h264(units: Iterator[memoryview]) -> bool | None:
        slices = 0
        for unit in units:
            if not len(unit) or unit[0] & 0x80:  # forbidden_zero_bit set: not a NAL we know
                return None
            nal_type, ref_idc = unit[0] & 0x1F, unit[0] >> 5
            if nal_type in H264_SLICE_TYPES:
                if ref_idc:
                    return True
                slices += 1
            elif nal_type in (2, 3, 4, 20, 21):  # data partitions, SVC/MVC slices
                return None
        return False if slices else None

    def _hevc(self, units: Iterator[memoryview]) -> bool | None:
        slices = 0
        for unit in units:
            if len(unit) < 2 or unit[0] & 0x80:
                return None
            nal_type = (unit[0] >> 1) & 0x3F
            layer_id = ((unit[0] & 1) << 5) | (unit[1] >> 3)
            temporal_id = (unit[1] & 0x7) - 1
            if nal_type == HEVC_SPS:
                self._note_hevc_unit(unit)
            if nal_type >= HEVC_VCL_END:
                continue
            if layer_id or nal_type not in HEVC_NON_REFERENCE_TYPES:
                return True if not layer_id else None
            if self.max_temporal_id is None or temporal_id != self.max_temporal_id:
                return True  # a higher sub-layer may reference it (or no SPS seen)
            slices += 1
        return False if slices else None
