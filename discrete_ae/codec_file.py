"""The whole-photo file of codec.py: a photo as 32x32 blocks, their integers range-coded under the
model's prior (fitted, learned or context) behind one header.

File format 4 (a 13-byte header, then the payload):

    byte  0      0xA0 | FORMAT (this file's magic nibble and version)
    bytes 1-4    width, height (big-endian uint16 each)
    bytes 5-8    the first 4 bytes of the model's fingerprint (coding.fingerprint)
    bytes 9-12   CRC-32 of (bytes 0-4, the whole fingerprint, the decoded integers)
    bytes 13-    the blocks in raster order, in runs of RUN_BLOCKS: each run one range-coded stream
                 (group by group, cut after the last byte the decoder needs), each run but the
                 last preceded by its byte length (RUN_LENGTH_BYTES, big-endian)

A photo of at most RUN_BLOCKS blocks (a megapixel) is one run: its bytes are format 1's but for the
version. Runs decode one after another with their own tables, so a file's memory is bounded by
one run, whatever size its header claims.

A truncated or corrupted file, one written by another model or prior, and a checkpoint without a
prior each stop with one line. The integers decode the same on any machine (integer coding under
float64 tables); the decoder network runs on DECODER_THREADS threads whatever the calling
process's count, so the pixels are the same bits for any thread count on one machine (tested), and
may differ in rounding across CPU types.

`model` below is a models.QuantizedVAE, used through its public methods only (coder, encode,
decode, its bottleneck's coding_values / coding_tables / indices_from_values).
"""
import binascii
from contextlib import contextmanager

import numpy as np
import torch

from discrete_ae import coding
from discrete_ae.data import read_rgb
from discrete_ae.errors import BitstreamError, DataError
from discrete_ae.geometry import IMAGE_SIZE as BLOCK
from discrete_ae.geometry import LATENT_HW
from discrete_ae.geometry import LATENT_POSITIONS as POSITIONS

MAGIC = 0xA
FORMAT = 4  # 1: one stream for all blocks (no runs); 2: context tables in float64; 3: on integers; 4: wavefront
HEADER = 13
SEED = 0  # DDCL's dither seed for every file: both sides know it
MAX_SIDE = 65535  # the header's uint16
MAX_PIXELS = 2**26  # a photo up to 64 megapixels (8192 x 8192): what a file may ask the decoder to allocate
NETWORK_BATCH = 1024  # blocks through the encoder or decoder network at once
RUN_BLOCKS = 1024  # blocks coded as one independent stream: decoding holds one run's tables at a time
RUN_LENGTH_BYTES = 3  # the byte length of each run but the last, before it
PHOTO_EXTENSIONS = (".png", ".jpg", ".jpeg")
DECODER_THREADS = 2  # fixed, not the caller's: a convolution's sums may be ordered by its thread count


MMAP_THRESHOLD = 64 << 20  # keep_freed_memory: blocks below this come from the heap, not a fresh mapping
TRIM_THRESHOLD = 128 << 20  # ... and the heap keeps this much free memory instead of returning it


def keep_freed_memory():
    """Tell glibc's malloc to keep freed memory for the next photo (mallopt M_MMAP_THRESHOLD and
    M_TRIM_THRESHOLD, fixed): by default the coder's and the networks' arrays of a few hundred KB are
    mapped afresh and unmapped for every photo, and each first touch of a page faults (docs/codec.md,
    "Speed", measures what it costs). What MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_
    set from the shell; codec.py calls it, a library leaves the process's allocator alone. True when set
    (glibc only: elsewhere nothing changes)."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(-3, MMAP_THRESHOLD) and libc.mallopt(-1, TRIM_THRESHOLD))  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD


@contextmanager
def decoder_threads():
    """Run the decoder network on DECODER_THREADS threads (more than the cores is slower, not different)."""
    before = torch.get_num_threads()
    torch.set_num_threads(DECODER_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def read_photo(path):
    """A photo file -> uint8 (H, W, 3), turned upright by its EXIF orientation."""
    import warnings

    from PIL import Image

    try:
        with Image.open(path) as img:  # the header alone: the size is known before any pixel is decoded
            width, height = img.size
        if width * height > MAX_PIXELS:
            raise DataError(f"{path} is {width}x{height}: this codec takes photos up to {MAX_PIXELS // 2**20} megapixels")
        with warnings.catch_warnings():  # under MAX_PIXELS, Pillow's bomb warning says nothing new
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            rgb, _ = read_rgb(path)
    except FileNotFoundError:
        raise DataError(f"no photo at {str(path)!r}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"{path} is not a photo Pillow can read ({type(err).__name__}: {str(err)[:80]})") from None
    if max(rgb.shape[:2]) > MAX_SIDE:
        raise DataError(f"{path} is {rgb.shape[1]}x{rgb.shape[0]}: the format holds sides up to {MAX_SIDE} pixels")
    return rgb


def to_tensor(rgb, device):
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)[None].float().div(255).to(device)


def _crc(header, full_fingerprint, values):
    data = header + full_fingerprint + np.ascontiguousarray(values, dtype="<i8").tobytes()
    return binascii.crc32(data).to_bytes(4, "big")


def to_blocks(rgb, device):
    """uint8 (H, W, 3) -> (N, 3, 32, 32) float blocks in [0, 1] on `device`, in raster order, the
    photo padded to whole blocks by repeating its last row and column (in 8 bits: a quarter of the
    bytes to copy); and the (rows, columns) of blocks."""
    rgb = np.pad(rgb, ((0, -rgb.shape[0] % BLOCK), (0, -rgb.shape[1] % BLOCK), (0, 0)), mode="edge")
    rows, cols = rgb.shape[0] // BLOCK, rgb.shape[1] // BLOCK
    x = to_tensor(rgb, device)
    return x.reshape(3, rows, BLOCK, cols, BLOCK).permute(1, 3, 0, 2, 4).reshape(-1, 3, BLOCK, BLOCK), (rows, cols)


def to_uint8(images):
    """Floats in [0, 1] -> uint8, rounded (what a decoded photo is)."""
    return images.clamp(0, 1).mul_(255).round_().to(torch.uint8).cpu()  # in place on clamp's copy


def from_blocks(blocks, grid, height, width):
    """(N, 3, 32, 32) floats in [0, 1] or uint8 -> uint8 (H, W, 3): the blocks put back and the
    padding cut off."""
    rows, cols = grid
    blocks = blocks if blocks.dtype == torch.uint8 else to_uint8(blocks)
    image = blocks.reshape(rows, cols, 3, BLOCK, BLOCK).permute(2, 0, 3, 1, 4).reshape(3, rows * BLOCK, cols * BLOCK)
    return image[:, :height, :width].permute(1, 2, 0).cpu().numpy()


def runs_of(count):
    """[(first block, blocks)] of the independent runs a photo of `count` blocks is coded in."""
    return [(start, min(RUN_BLOCKS, count - start)) for start in range(0, count, RUN_BLOCKS)]


def read_runs(payload, count):
    """The payload -> the byte string of each run, checked against its length before anything is
    decoded: a header that claims more blocks than the payload holds fails here, at once."""
    runs, pos, parts = runs_of(count), 0, []
    for k in range(len(runs) - 1):
        length = int.from_bytes(payload[pos:pos + RUN_LENGTH_BYTES], "big")
        pos += RUN_LENGTH_BYTES
        if pos + length > len(payload):
            raise BitstreamError(f"the file's run {k + 1} of {len(runs)} needs {length} bytes, {len(payload) - pos} are "
                                 "left: it is truncated, or its header is not the one it was written with")
        parts.append(payload[pos:pos + length])
        pos += length
    return parts + [payload[pos:]]


class PhotoCodec:
    """The file format for one model whose weights stay as they are while it codes: its fingerprint
    computed once for every photo (a hash of all its weights), the model put in evaluation mode.
    `encode_photo` and `decode_photo` build one per call."""

    def __init__(self, model):
        self.model, self.q = model, model.coder()
        model.eval()
        self.fingerprint = coding.fingerprint(model)
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def encode(self, rgb):
        """uint8 (H, W, 3) -> the file's bytes."""
        model, q = self.model, self.q
        height, width = rgb.shape[:2]
        blocks, _ = to_blocks(rgb, self.device)
        indices = torch.cat([model.encode(blocks[i:i + NETWORK_BATCH], seed=SEED) for i in range(0, len(blocks), NETWORK_BATCH)])
        values = q.coding_values(indices).cpu().numpy()  # (N, G, 16)
        payload = b""
        runs = runs_of(len(values))
        for k, (start, n) in enumerate(runs):
            part = coding.encode_batch(values[start:start + n], q.coding_tables(n, POSITIONS, SEED))
            payload += (len(part).to_bytes(RUN_LENGTH_BYTES, "big") if k < len(runs) - 1 else b"") + part
        header = bytes([MAGIC << 4 | FORMAT]) + width.to_bytes(2, "big") + height.to_bytes(2, "big")
        return header + self.fingerprint[:4] + _crc(header, self.fingerprint, values) + payload

    @torch.no_grad()
    def decode(self, blob):
        """The file's bytes -> uint8 (H, W, 3); BitstreamError names what is wrong with a bad file."""
        model, q, fingerprint = self.model, self.q, self.fingerprint
        if len(blob) < HEADER:
            raise BitstreamError(f"the file has {len(blob)} bytes, fewer than the {HEADER}-byte header: truncated")
        if blob[0] >> 4 != MAGIC:
            raise BitstreamError("the file does not start with codec.py's magic: not written by `python codec.py compress`")
        if blob[0] & 0xF != FORMAT:
            raise BitstreamError(f"the file is codec format {blob[0] & 0xF}; this code reads format {FORMAT}")
        width, height = int.from_bytes(blob[1:3], "big"), int.from_bytes(blob[3:5], "big")
        if width * height > MAX_PIXELS or not width or not height:
            raise BitstreamError(f"the header says {width}x{height} pixels; this codec writes 1 to {MAX_PIXELS // 2**20} "
                                 "megapixels: the file is corrupted or not this codec's")
        if blob[5:9] != fingerprint[:4]:
            raise BitstreamError(f"the file was written with another model (fingerprint {blob[5:9].hex()}, this checkpoint's "
                                 f"{fingerprint[:4].hex()}): decode it with the checkpoint that compressed it")
        grid = (-(-height // BLOCK), -(-width // BLOCK))  # rows, columns of whole blocks, as to_blocks pads
        count = grid[0] * grid[1]
        decoded = []
        for part, (_, n) in zip(read_runs(bytes(blob[HEADER:]), count), runs_of(count)):
            values, readable = coding.decode_batch(part, q.coding_tables(n, POSITIONS, SEED), n)  # one run's tables at a time
            if not readable:
                raise BitstreamError("the file fails its checksum: it is truncated or corrupted")
            decoded.append(values)
        values = np.concatenate(decoded)
        if _crc(bytes(blob[:5]), fingerprint, values) != bytes(blob[9:13]):
            raise BitstreamError("the file fails its checksum: it is truncated or corrupted")
        with decoder_threads():
            indices = q.indices_from_values(torch.from_numpy(values), LATENT_HW)
            blocks = torch.cat([to_uint8(model.decode(indices[i:i + NETWORK_BATCH].to(self.device), seed=SEED))
                                for i in range(0, len(indices), NETWORK_BATCH)])  # 8-bit as they come: a quarter the memory
        return from_blocks(blocks, grid, height, width)


def encode_photo(model, rgb):
    """uint8 (H, W, 3) -> the file's bytes (PhotoCodec(model).encode: one photo)."""
    return PhotoCodec(model).encode(rgb)


def decode_photo(model, blob):
    """The file's bytes -> uint8 (H, W, 3) (PhotoCodec(model).decode: one photo)."""
    return PhotoCodec(model).decode(blob)
