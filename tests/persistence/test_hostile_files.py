"""Files from outside, made to hurt: bombs, forged sizes and settings, links out of the folder.

Each is refused with a SafeLoadError whose message is one line of bounded length, names the limit
where one applies, and quotes nothing of the file's contents. The bombs also run in a subprocess
under ``ulimit -v``, where reading them whole or building what they describe ends in a MemoryError.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3 import DQN
from stable_baselines3.common.buffers import ReplayBuffer

from rollback_rl.persistence.checkpoints import CheckpointStore, load_replay_buffer, save_replay_buffer
from rollback_rl.persistence.limits import MAX_MESSAGE_CHARS, MAX_ZIP_MEMBERS
from rollback_rl.persistence.safe_io import (
    CorruptFileError,
    OutOfRangeError,
    SafeLoadError,
    UnsafeFileError,
    load_json_file,
    load_tensors,
    save_tensors,
)
from rollback_rl.persistence.safe_model import load_model, load_sb3_zip_safely, save_model

torch.set_num_threads(1)
# SB3 zips keep train_freq only as a pickle: loading one warns that the default is used.
pytestmark = pytest.mark.filterwarnings("ignore:.*stored only as pickles")
REPOSITORY = Path(__file__).resolve().parents[2]
SECRET = b"TOPSECRET-0123456789"


def refusal(error_type: type[SafeLoadError], call, *words: str) -> str:
    """The error ``call()`` raises: of ``error_type``, one bounded line with ``words``, no secret."""
    with pytest.raises(error_type) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and len(message) <= MAX_MESSAGE_CHARS, message
    assert "TOPSECRET" not in message, message
    for word in words:
        assert word in message, (word, message)
    return message


# -- zip files made by hand: entries that inflate to gigabytes ------------------------------------------

def deflated_zeros(total: int, chunk: int = 2**20) -> bytes:
    """A raw deflate stream of ``total`` zero bytes, about 1,000 times smaller: one fully flushed
    compressed chunk (which refers to nothing before it) repeated, then an empty final block."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(bytes(chunk)) + compressor.flush(zlib.Z_FULL_FLUSH)
    return block * (total // chunk) + zlib.compressobj(9, zlib.DEFLATED, -15).flush()


def deflated(data: bytes) -> tuple[bytes, int, int]:
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush(), zlib.crc32(data), len(data)


def write_zip64(path: Path, members: list[tuple[str, bytes, int, int]]) -> Path:
    """A ZIP64 archive of ``(name, raw deflate stream, CRC-32, inflated size as declared)`` entries,
    written by hand: the declared sizes may be anything, honest or not."""
    out, central = bytearray(), bytearray()
    for name, raw, crc, size in members:
        encoded, offset = name.encode(), len(out)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, 8, 0, 0x21, crc, 0xFFFFFFFF, 0xFFFFFFFF, len(encoded), 20)
        out += encoded + struct.pack("<HHQQ", 1, 16, size, len(raw)) + raw
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 8, 0, 0x21, crc, 0xFFFFFFFF, 0xFFFFFFFF,
                               len(encoded), 28, 0, 0, 0, 0, 0xFFFFFFFF)
        central += encoded + struct.pack("<HHQQQ", 1, 24, size, len(raw), offset)
    directory_offset, record_offset = len(out), len(out) + len(central)
    out += central
    out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, len(members), len(members), len(central),
                       directory_offset)
    out += struct.pack("<IIQI", 0x07064B50, 0, record_offset, 1)
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    path.write_bytes(bytes(out))
    return path


def small_dqn(**kwargs) -> DQN:
    settings = dict(buffer_size=100, learning_starts=0, policy_kwargs=dict(net_arch=[8]), seed=0)
    return DQN("MlpPolicy", "CartPole-v1", **{**settings, **kwargs})


@pytest.fixture(scope="module")
def sb3_members(tmp_path_factory) -> dict[str, bytes]:
    """The entries of a real SB3 zip of a small DQN."""
    path = tmp_path_factory.mktemp("sb3") / "model.zip"
    small_dqn().save(path)
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def sb3_zip(path: Path, members: dict[str, bytes], replaced: dict[str, tuple[bytes, int, int]]) -> Path:
    entries = [(name, *replaced[name]) if name in replaced else (name, *deflated(data)) for name, data in members.items()]
    return write_zip64(path, entries)


def test_the_hand_made_bomb_really_inflates_to_10_gb(tmp_path):
    bomb = write_zip64(tmp_path / "bomb.zip", [("data", deflated_zeros(10 * 2**30), 0, 10 * 2**30)])
    assert bomb.stat().st_size < 11 * 10**6
    with zipfile.ZipFile(bomb) as archive, archive.open("data") as member:
        assert archive.getinfo("data").file_size == 10 * 2**30
        assert member.read(2**20) == bytes(2**20)  # and so on, for 10 GB


def test_an_11_mb_zip_whose_data_inflates_to_10_gb_is_refused_from_its_directory(tmp_path, sb3_members):
    bomb = sb3_zip(tmp_path / "model.zip", sb3_members, {"data": (deflated_zeros(10 * 2**30), 0, 10 * 2**30)})
    started = time.perf_counter()
    refusal(OutOfRangeError, lambda: load_sb3_zip_safely(bomb, "DQN", "CartPole-v1"),
            "inflated total", "10,737,4", "MAX_TENSOR_FILE_BYTES")
    assert time.perf_counter() - started < 1.0


def test_a_data_entry_over_the_json_limit_is_refused_before_inflating(tmp_path, sb3_members):
    bomb = sb3_zip(tmp_path / "model.zip", sb3_members, {"data": (deflated_zeros(2**30), 0, 2**30)})
    refusal(OutOfRangeError, lambda: load_sb3_zip_safely(bomb, "DQN", "CartPole-v1"), "'data'", "MAX_JSON_BYTES")


def test_a_directory_that_understates_the_size_is_caught_while_inflating(tmp_path, sb3_members):
    lying = sb3_zip(tmp_path / "model.zip", sb3_members, {"data": (deflated_zeros(10 * 2**30), 0, 1_000)})
    refusal(CorruptFileError, lambda: load_sb3_zip_safely(lying, "DQN", "CartPole-v1"), "corrupted zip")


def test_a_weights_entry_larger_than_the_model_it_fits_is_refused_before_inflating(tmp_path, sb3_members):
    bomb = sb3_zip(tmp_path / "model.zip", sb3_members, {"policy.pth": (deflated_zeros(3 * 2**30), 0, 3 * 2**30)})
    refusal(OutOfRangeError, lambda: load_sb3_zip_safely(bomb, "DQN", "CartPole-v1"),
            "'policy.pth'", "3,221,225,472", "4 x the weights")


def test_a_zip_with_too_many_entries_is_refused(tmp_path, sb3_members):
    empty = deflated(b"")
    crowded = write_zip64(tmp_path / "model.zip", [(f"entry{i}", *empty) for i in range(MAX_ZIP_MEMBERS + 1)])
    refusal(OutOfRangeError, lambda: load_sb3_zip_safely(crowded, "DQN", "CartPole-v1"), "MAX_ZIP_MEMBERS")


@pytest.mark.parametrize("change, words", [
    (lambda data: {**data, "buffer_size": 10**13}, ("buffer_size", "MAX_BUFFER_SIZE")),
    (lambda data: {**data, "learning_rate": float("inf")}, ("learning_rate", "finite")),
    (lambda data: {**data, "batch_size": 10**12}, ("batch_size", "MAX_BATCH_SIZE")),
    (lambda data: {**data, "_total_timesteps": 10**30}, ("_total_timesteps", "MAX_TIMESTEPS")),
], ids=["buffer_size", "learning_rate", "batch_size", "total_timesteps"])
def test_forged_settings_in_an_sb3_zip_are_refused(tmp_path, sb3_members, change, words):
    data = json.loads(sb3_members["data"])
    forged = sb3_zip(tmp_path / "model.zip", {**sb3_members, "data": json.dumps(change(data)).encode()}, {})
    refusal(OutOfRangeError, lambda: load_sb3_zip_safely(forged, "DQN", "CartPole-v1"), *words)


def test_deep_json_in_an_sb3_zip_is_refused(tmp_path, sb3_members):
    deep = sb3_zip(tmp_path / "model.zip", {**sb3_members, "data": b"[" * 200_000 + b"]" * 200_000}, {})
    refusal(OutOfRangeError, lambda: load_sb3_zip_safely(deep, "DQN", "CartPole-v1"), "MAX_NESTING_DEPTH")


# -- safetensors files -------------------------------------------------------------------------------

def test_a_sparse_20_gb_model_file_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "model.safetensors"
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", 100))
        file.truncate(20 * 2**30)
    started = time.perf_counter()
    refusal(OutOfRangeError, lambda: load_model(path), f"{20 * 2**30:,}", "MAX_TENSOR_FILE_BYTES")
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize("prefix", [struct.pack("<Q", 2**40), SECRET[:8], struct.pack("<Q", 5_000)],
                         ids=["huge-length", "text", "past-the-end"])
def test_a_bad_header_length_is_refused_without_printing_it(tmp_path, prefix):
    path = tmp_path / "model.safetensors"
    path.write_bytes(prefix + b"{}" + SECRET)
    message = refusal(CorruptFileError, lambda: load_tensors(path), "header length")
    assert str(struct.unpack("<Q", prefix)[0]) not in message.replace(",", "")


def forged_model_file(folder: Path, change) -> Path:
    """A model file whose metadata ``change`` edited, saved again with its checksum recomputed: it
    verifies, so only the checks on its values stand between it and the model it describes."""
    folder.mkdir(exist_ok=True)
    path = save_model(small_dqn(), folder / "model")
    tensors, metadata = load_tensors(path)
    change(metadata)
    save_tensors(path, tensors, metadata)
    return path


FORGED_SETTINGS = {
    "buffer_size-1e13": (lambda m: m["settings"].update(buffer_size=10**13), OutOfRangeError, "MAX_BUFFER_SIZE"),
    "net_arch-40000": (lambda m: m["settings"].update(policy_kwargs={"net_arch": [40_000, 40_000]}),
                       OutOfRangeError, "MAX_LAYER_WIDTH"),
    "learning_rate-inf": (lambda m: m["settings"].update(learning_rate=float("inf")), OutOfRangeError, "finite"),
    "learning_rate-nan": (lambda m: m["settings"].update(learning_rate=float("nan")), OutOfRangeError, "finite"),
    "n_envs-1e8": (lambda m: m["settings"].update(n_envs=10**8), OutOfRangeError, "MAX_N_ENVS"),
    "num_timesteps-1e30": (lambda m: m["settings"].update(num_timesteps=10**30), OutOfRangeError, "MAX_TIMESTEPS"),
    "train_freq-1e12": (lambda m: m["settings"].update(train_freq={"__train_freq__": [10**12, "step"]}),
                        OutOfRangeError, "MAX_TRAIN_FREQ"),
    "actions-1e9": (lambda m: m["settings"]["action_space"]["__space__"].update(n=10**9), OutOfRangeError,
                    "MAX_HIDDEN_WEIGHTS"),
    "schedule-inf": (lambda m: m["settings"].update(
        exploration_schedule={"__schedule__": "LinearSchedule", "start": float("inf"), "end": 0.0, "end_fraction": 1.0}),
        CorruptFileError, "finite"),
    "dtype-subarray": (lambda m: m["settings"]["observation_space"]["__space__"].update(dtype="(100000,100000)f8"),
                       CorruptFileError, "dtype"),
    "settings-deep": (lambda m: m["settings"].update(policy_kwargs={"net_arch": [8], "x": json.loads("[" * 70 + "]" * 70)}),
                      OutOfRangeError, "MAX_NESTING_DEPTH"),
    "algorithm-unknown": (lambda m: m.update(algorithm="os.system"), ValueError, "unsupported algorithm"),
}


@pytest.mark.parametrize("name", FORGED_SETTINGS)
def test_forged_settings_in_a_model_file_are_refused_before_building(tmp_path, name):
    change, error_type, word = FORGED_SETTINGS[name]
    path = forged_model_file(tmp_path, change)
    started = time.perf_counter()
    with pytest.raises(error_type) as caught:
        load_model(path)
    assert word in str(caught.value) and "\n" not in str(caught.value), str(caught.value)
    assert len(str(caught.value)) <= MAX_MESSAGE_CHARS
    assert time.perf_counter() - started < 2.0


def test_an_unforged_model_file_still_loads(tmp_path):
    path = forged_model_file(tmp_path, lambda metadata: None)
    assert load_model(path).buffer_size == 100


def test_deep_json_in_a_safetensors_header_is_refused(tmp_path):
    header = b"[" * 200_000 + b"]" * 200_000
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    refusal(OutOfRangeError, lambda: load_tensors(path), "MAX_NESTING_DEPTH")


# -- links out of the folder, and things that are not files -----------------------------------------

@pytest.fixture
def outside(tmp_path) -> Path:
    """A file outside the run folder ``tmp_path / "run"`` (created), with a secret in it."""
    (tmp_path / "run").mkdir()
    path = tmp_path / "private.key"
    path.write_bytes(SECRET * 100)
    return path


@pytest.mark.parametrize("name", ["model.safetensors", "model.zip", "manifest.json"])
def test_a_link_out_of_the_folder_is_refused_without_reading_it(tmp_path, outside, name):
    link = tmp_path / "run" / name
    link.symlink_to(outside)
    loaders = {"model.safetensors": lambda: load_model(link), "model.zip": lambda: load_sb3_zip_safely(link, "DQN", "CartPole-v1"),
               "manifest.json": lambda: load_json_file(link)}
    refusal(UnsafeFileError, loaders[name], "symbolic link", "outside its folder")


def test_a_link_within_the_folder_is_followed(tmp_path):
    path = save_model(small_dqn(), tmp_path / "model-100")
    (tmp_path / "model.safetensors").symlink_to(path.name)
    assert load_model(tmp_path / "model.safetensors").buffer_size == 100


@pytest.mark.parametrize("target", ["/dev/zero", "/dev/urandom"])
def test_a_device_instead_of_a_file_is_refused_at_once(tmp_path, target):
    link = tmp_path / "model.safetensors"
    link.symlink_to(target)
    with pytest.raises(SafeLoadError):  # outside the folder, and not a regular file either way
        load_tensors(link)
    os.mkfifo(tmp_path / "pipe.safetensors")
    refusal(CorruptFileError, lambda: load_tensors(tmp_path / "pipe.safetensors"), "not a regular file")


# -- checkpoints -------------------------------------------------------------------------------------

def checkpoint_with_manifest(folder: Path, manifest: bytes | dict) -> CheckpointStore:
    store = CheckpointStore(folder / "checkpoints")
    store.save(100, {"weights.bin": b"1234"})
    data = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    (store.path_of(100) / "manifest.json").write_bytes(data)
    return store


@pytest.mark.parametrize("name", ["../../private.key", "/etc/passwd", "..", ".hidden", "a/b"])
def test_a_manifest_naming_files_outside_its_checkpoint_is_refused(tmp_path, outside, name):
    store = checkpoint_with_manifest(tmp_path, {"step": 100, "files": {name: {"bytes": 2000, "sha256": "x"}}})
    refusal(CorruptFileError, lambda: store.load(100), "not a plain file name")
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        assert store.latest() is None


def test_a_deep_or_huge_manifest_is_refused(tmp_path):
    store = checkpoint_with_manifest(tmp_path, b"[" * 200_000 + b"]" * 200_000)
    refusal(OutOfRangeError, lambda: store.load(100), "MAX_NESTING_DEPTH")
    with open(store.path_of(100) / "manifest.json", "wb") as file:
        file.truncate(20 * 2**30)
    refusal(OutOfRangeError, lambda: store.load(100), "MAX_JSON_BYTES")


def test_linked_checkpoints_and_pointers_are_not_followed(tmp_path, outside):
    store = CheckpointStore(tmp_path / "run" / "checkpoints")
    store.save(100, {"weights.bin": b"1234"})
    elsewhere = CheckpointStore(tmp_path / "elsewhere")
    elsewhere.save(900, {"weights.bin": b"5678"})
    (store.run_dir / "checkpoint-900").symlink_to(elsewhere.path_of(900))
    (store.run_dir / "LATEST").unlink()
    (store.run_dir / "LATEST").symlink_to("/dev/zero")
    started = time.perf_counter()
    assert store.steps() == [100] and store.latest().step == 100
    assert time.perf_counter() - started < 1.0


def test_a_replay_buffer_with_a_forged_array_header_is_refused_before_reading(tmp_path):
    buffer = ReplayBuffer(16, spaces.Box(-1, 1, (3,)), spaces.Discrete(2), device="cpu")
    save_replay_buffer(tmp_path / "buffer.npz", buffer)
    with zipfile.ZipFile(tmp_path / "buffer.npz") as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    header = np.lib.format.header_data_from_array_1_0(np.zeros((16, 1, 3), dtype=np.float32))
    header["shape"] = (10**12, 1, 3)
    forged = io_bytes_of_npy_header(header) + members["observations.npy"][128:]
    write_zip64(tmp_path / "forged.npz", [(name, *deflated(forged if name == "observations.npy" else data))
                                           for name, data in members.items()])
    refusal(CorruptFileError, lambda: load_replay_buffer(tmp_path / "forged.npz", buffer), "the buffer's is")


def io_bytes_of_npy_header(header: dict) -> bytes:
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, header)
    return stream.getvalue()


# -- under a memory cap ---------------------------------------------------------------------------------

MEMORY_CAP_KB = 2_000_000  # importing torch and SB3 and building a small DQN takes about 1 GB of address space


def run_under_memory_cap(code: str) -> subprocess.CompletedProcess:
    command = f"ulimit -v {MEMORY_CAP_KB} && exec {shlex.quote(sys.executable)} -c {shlex.quote(code)}"
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=180,
                          cwd=REPOSITORY, env={**os.environ, "PYTHONPATH": str(REPOSITORY)})


@pytest.mark.skipif(sys.platform != "linux", reason="ulimit -v")
def test_bombs_and_forged_sizes_are_refused_under_a_memory_cap(tmp_path, sb3_members):
    files = [
        sb3_zip(tmp_path / "data-bomb.zip", sb3_members, {"data": (deflated_zeros(10 * 2**30), 0, 10 * 2**30)}),
        sb3_zip(tmp_path / "weights-bomb.zip", sb3_members, {"policy.pth": (deflated_zeros(3 * 2**30), 0, 3 * 2**30)}),
        forged_model_file(tmp_path / "buffer", lambda m: m["settings"].update(buffer_size=10**13)),
        forged_model_file(tmp_path / "net", lambda m: m["settings"].update(policy_kwargs={"net_arch": [40_000, 40_000]})),
    ]
    sparse = tmp_path / "sparse.safetensors"
    with open(sparse, "wb") as file:
        file.truncate(20 * 2**30)
    code = textwrap.dedent(f"""
        import warnings
        warnings.simplefilter("ignore")
        from rollback_rl.persistence.safe_io import SafeLoadError
        from rollback_rl.persistence.safe_model import load_model, load_sb3_zip_safely
        for path in {[str(path) for path in files] + [str(sparse)]!r}:
            try:
                if path.endswith(".zip"):
                    load_sb3_zip_safely(path, "DQN", "CartPole-v1")
                else:
                    load_model(path)
            except SafeLoadError as error:
                print("refused:", error)
        """)
    result = run_under_memory_cap(code)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 5 and all(line.startswith("refused:") for line in lines), result.stdout
    for line, limit in zip(lines, ("MAX_TENSOR_FILE_BYTES", "4 x the weights", "MAX_BUFFER_SIZE", "MAX_LAYER_WIDTH",
                                   "MAX_TENSOR_FILE_BYTES")):
        assert limit in line, line


@pytest.mark.skipif(sys.platform != "linux", reason="ulimit -v")
def test_the_memory_cap_is_too_low_for_what_the_bombs_describe():
    result = run_under_memory_cap("import rollback_rl.persistence.safe_model; bytearray(3 * 2**30)")
    assert result.returncode != 0 and "MemoryError" in result.stderr
