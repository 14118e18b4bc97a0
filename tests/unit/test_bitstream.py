"""Reading a packet's reference status from its NAL headers (worker/bitstream.py), on
hand-made H.264 and HEVC units: what lets vidq skip unreferenced, unsampled packets
(tests/test_skip_frames.py shows that skipping never changes a decoded frame)."""

from __future__ import annotations

from worker.bitstream import ReferenceReader

SEI, AUD = bytes([0x06, 0x05]), bytes([0x09, 0xF0])


def length_prefixed(*units: bytes, size: int = 4) -> bytes:
    return b"".join(len(u).to_bytes(size, "big") + u for u in units)


def annexb(*units: bytes) -> bytes:
    return b"".join(b"\x00\x00\x00\x01" + u for u in units)


AVCC = bytes([1, 0x64, 0, 0x1F, 0xFF, 0xE0])  # lengthSizeMinusOne = 3, no SPS/PPS


def h264_slice(ref_idc: int, nal_type: int = 1) -> bytes:
    return bytes([(ref_idc << 5) | nal_type, 0x88, 0x84])


def test_h264_reference_status_from_nal_ref_idc() -> None:
    mp4 = ReferenceReader(codec="h264", extradata=AVCC + b"\x00")
    assert mp4.length_size == 4
    assert mp4.is_reference(length_prefixed(AUD, SEI, h264_slice(0))) is False
    assert mp4.is_reference(length_prefixed(h264_slice(0), h264_slice(0))) is False
    assert mp4.is_reference(length_prefixed(h264_slice(2))) is True
    assert mp4.is_reference(length_prefixed(h264_slice(0), h264_slice(1))) is True
    assert mp4.is_reference(length_prefixed(h264_slice(3, nal_type=5))) is True
    assert mp4.is_reference(length_prefixed(SEI)) is None  # no slice: cannot tell
    assert mp4.is_reference(length_prefixed(h264_slice(0))[:-1]) is None  # lengths do not add up
    assert mp4.is_reference(length_prefixed(h264_slice(0, nal_type=2))) is None  # partition
    two_byte = ReferenceReader(codec="h264", extradata=bytes([1, 0x64, 0, 0x1F, 0xFD, 0xE0, 0]))
    assert two_byte.is_reference(length_prefixed(h264_slice(0), size=2)) is False
    ts = ReferenceReader(codec="h264", extradata=None)
    assert ts.length_size == 0
    assert ts.is_reference(annexb(AUD, h264_slice(0))) is False
    start = b"\x00\x00\x01"  # a three-byte start code
    assert ts.is_reference(start + h264_slice(0) + start + h264_slice(1)) is True
    assert ts.is_reference(b"garbage without start codes") is None


def hevc_nal(nal_type: int, temporal_id: int = 0) -> bytes:
    return bytes([nal_type << 1, temporal_id + 1, 0xAF, 0x00])


def hevc_sps(max_sub_layers: int) -> bytes:
    return bytes([33 << 1, 1, (max_sub_layers - 1) << 1, 0x60])


def test_hevc_reference_status_from_nal_unit_type_and_sub_layer() -> None:
    reader = ReferenceReader(codec="hevc", extradata=None)
    # No SPS seen yet: a sub-layer non-reference picture may feed a higher sub-layer.
    assert reader.is_reference(annexb(hevc_nal(0))) is True
    assert reader.is_reference(annexb(hevc_sps(1), hevc_nal(19))) is True  # IDR_W_RADL
    for n_type in (0, 2, 4, 6, 8, 10, 12, 14):
        assert reader.is_reference(annexb(hevc_nal(35), hevc_nal(n_type))) is False, n_type
    for r_type in (1, 3, 5, 7, 9, 16, 19, 21):
        assert reader.is_reference(annexb(hevc_nal(r_type))) is True, r_type
    assert reader.is_reference(annexb(hevc_nal(39))) is None  # SEI only
    layered = ReferenceReader(codec="hevc", extradata=annexb(hevc_sps(2)))
    # TemporalId 1 may use it:
    assert layered.is_reference(annexb(hevc_nal(0, temporal_id=0))) is True
    assert layered.is_reference(annexb(hevc_nal(0, temporal_id=1))) is False
    hvcc = bytearray(23)
    hvcc[0], hvcc[21], hvcc[22] = 1, 0x03, 1
    sps = hevc_sps(1)
    hvcc += bytes([33]) + (1).to_bytes(2, "big") + len(sps).to_bytes(2, "big") + sps
    mp4 = ReferenceReader(codec="hevc", extradata=bytes(hvcc))
    assert mp4.length_size == 4 and mp4.max_temporal_id == 0
    assert mp4.is_reference(length_prefixed(hevc_nal(1))) is True
    assert mp4.is_reference(length_prefixed(hevc_nal(0))) is False


def test_other_codecs_are_never_read() -> None:
    for codec in ("vp9", "mpeg4", "av1"):
        reader = ReferenceReader(codec=codec, extradata=b"\x01" * 30)
        assert reader.is_reference(b"\x00" * 20) is None
