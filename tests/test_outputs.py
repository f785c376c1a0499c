"""What any program may write: regular files only (a FIFO, a device or a folder is refused and left
as it was; a symbolic link is written through to its file), an existing file keeps its mode, and an
output that is one of the inputs is refused before anything is read or written."""
import os
import stat

import pytest

import codec
from discrete_ae.errors import UserError
from discrete_ae.files import atomic_write, save_json


def test_a_fifo_a_folder_or_a_link_to_a_fifo_is_refused_and_left_as_it_was(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "link"
    link.symlink_to(fifo)
    folder = tmp_path / "folder"
    folder.mkdir()
    for target, kind in ((fifo, "a FIFO"), (link, "a FIFO"), (folder, "a folder")):
        with pytest.raises(UserError, match=f"is {kind}, not a file"):
            save_json(target, {"x": 1})
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and link.is_symlink() and folder.is_dir()
    assert sorted(os.listdir(tmp_path)) == ["folder", "link", "pipe"]  # no temporary file left


def test_a_link_to_a_file_is_written_through_and_a_file_keeps_its_mode(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("{}")
    os.chmod(real, 0o600)
    link = tmp_path / "link.json"
    link.symlink_to(real)
    save_json(link, {"x": 1})
    assert link.is_symlink() and real.read_text().strip() == '{\n  "x": 1\n}'
    assert stat.S_IMODE(os.stat(real).st_mode) == 0o600
    atomic_write(real, lambda f: f.write(b"again"))
    assert stat.S_IMODE(os.stat(real).st_mode) == 0o600 and real.read_bytes() == b"again"


def test_codec_refuses_an_output_that_is_one_of_its_inputs(run_train, tmp_path, image_folder):
    run_train(quantizer="fsq")
    ck = str(tmp_path / "checkpoints" / "fsq_vae_best.pt")
    photo = os.path.join(image_folder, "test", "0000.png")
    before = open(photo, "rb").read()
    for target in (photo, ck):
        with pytest.raises(UserError, match="would destroy the input"):
            codec.compress_file(ck, photo, target)
    assert open(photo, "rb").read() == before
    size, _, _ = codec.compress_file(ck, photo, tmp_path / "p.bin")
    with pytest.raises(UserError, match="would destroy the input"):
        codec.decompress_file(ck, tmp_path / "p.bin", tmp_path / "p.bin")
    assert os.path.getsize(tmp_path / "p.bin") == size
