"""The batched tensor pipeline (data.pipeline=tensor): ops, distributions, loader contract."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import epoch_batches
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from loco.config import Config, DataConfig
from loco.data import gpu_augment as G
from loco.data.augment import SimCLRParams, SimCLRTransform
from loco.data.folder import SkippedImages, load_rgb
from loco.data.jpeg_loader import (
    EncodedImages,
    TensorPipelineLoader,
    decode_on_device,
    pil_to_tensor,
)
from loco.data.loaders import build_pretrain_loader, set_loader_epoch, steps_per_epoch
from loco.data.shipped import find_shared_data

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# torchvision 0.29 marks its image decoders deprecated (in favour of TorchCodec) on every call
pytestmark = [
    pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning"),
    pytest.mark.usefixtures("one_thread"),
]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def clothing_paths(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Real clothing photos (JPEG, mostly 400x533), the first 24 per class of the val split,
    read straight from the shipped tar."""
    dest = tmp_path_factory.mktemp("clothing")
    taken: dict[str, int] = {}
    with tarfile.open(find_shared_data() / "clothing" / "clothing-small.tar") as tar:
        for member in tar:
            parts = member.name.split("/")
            if len(parts) == 4 and parts[1] == "val" and parts[3].endswith(".jpg"):
                if taken.setdefault(parts[2], 0) < 24:
                    taken[parts[2]] += 1
                    (dest / parts[2]).mkdir(exist_ok=True)
                    (dest / parts[2] / parts[3]).write_bytes(tar.extractfile(member).read())
    return sorted(dest.glob("*/*.jpg"))


@pytest.fixture
def tiny_root(tmp_path: Path, cifar_val_root: Path) -> Path:
    """train/: 10 classes x 8 real CIFAR JPEGs."""
    for cls_dir in sorted((cifar_val_root / "val").iterdir()):
        (tmp_path / "train" / cls_dir.name).mkdir(parents=True)
        for img in sorted(cls_dir.iterdir())[:8]:
            shutil.copy(img, tmp_path / "train" / cls_dir.name / img.name)
    return tmp_path


def tensor_cfg(root: Path, **data: object) -> Config:
    cfg = Config()
    cfg.data.dataset, cfg.data.root, cfg.data.pipeline = "folder", str(root), "tensor"
    cfg.data.num_workers = 0
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def params(**data: object) -> SimCLRParams:
    return SimCLRParams.from_config(DataConfig(**data))


# ---------------------------------------------------------------- pixel ops


def test_ops_match_torchvision(clothing_paths: list[Path]) -> None:
    """Each batched op with per-sample arguments equals torchvision's op sample by sample."""
    images = [decode_jpeg(read_file(str(p)), mode=ImageReadMode.RGB) for p in clothing_paths[:6]]
    x = torch.stack([TF.resize(im, [48, 40], antialias=True) for im in images]).float() / 255
    x[0] = 0.5  # flat grey: hue undefined, chroma 0
    factor = torch.tensor([0.0, 0.6, 1.0, 1.4, 1.8, 0.2])
    shift = torch.tensor([-0.5, -0.1, 0.0, 0.05, 0.1, 0.5])
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 0.7])
    cases = [
        (G.adjust_brightness, TF.adjust_brightness, factor),
        (G.adjust_contrast, TF.adjust_contrast, factor),
        (G.adjust_saturation, TF.adjust_saturation, factor),
        (G.adjust_hue, TF.adjust_hue, shift),
        (
            lambda y, s: G.gaussian_blur(y, 9, s),
            lambda y, s: TF.gaussian_blur(y, [9, 9], [s]),
            sigma,
        ),
    ]
    for ours, theirs, arg in cases:
        expected = torch.stack([theirs(x[i], float(arg[i])) for i in range(len(x))])
        assert torch.allclose(ours(x, arg), expected, atol=1e-5), theirs.__name__
    gray = G.grayscale(x).expand(-1, 3, -1, -1)
    assert torch.allclose(gray, TF.rgb_to_grayscale(x, num_output_channels=3), atol=1e-6)
    assert torch.equal(G.solarize(x, 128 / 255), TF.solarize(x, 128 / 255))


def test_resized_crops_equal_torchvision_resize(clothing_paths: list[Path]) -> None:
    """Crop + antialiased bilinear resize + flip, uint8 on the CPU: torchvision's pixels."""
    images = [decode_jpeg(read_file(str(p)), mode=ImageReadMode.RGB) for p in clothing_paths[:3]]
    boxes = torch.tensor([[0, 0, 533, 400], [100, 50, 200, 150], [10, 300, 20, 25]])
    flip = torch.tensor([False, True, False])
    out = G.resized_crops(images, [0, 1, 2], boxes, flip, 56)
    assert out.dtype == torch.uint8 and out.shape == (3, 3, 56, 56)
    for k, (top, left, h, w) in enumerate(boxes.tolist()):
        ref = TF.resized_crop(images[k], top, left, h, w, [56, 56], antialias=True)
        assert torch.equal(out[k], ref.flip(-1) if flip[k] else ref)


# ---------------------------------------------------------------- parameter distributions


@pytest.mark.parametrize("hw", [(533, 400), (32, 32), (40, 400)])
def test_crop_boxes_follow_random_resized_crop(hw: tuple[int, int]) -> None:
    """Same box distribution as v2.RandomResizedCrop, fallback (wide image) included."""
    p, n = params(image_size=32), 3000
    u = torch.from_numpy(np.random.default_rng(0).random((n, G.NUM_UNIFORMS)))
    ours = G.crop_boxes(p, u, torch.full((n,), hw[0]), torch.full((n,), hw[1])).double()
    rrc = v2.RandomResizedCrop(32, scale=p.crop_scale, ratio=p.crop_ratio)
    torch.manual_seed(0)
    flat = [torch.empty(3, *hw)]
    ref = torch.tensor(
        [list(rrc.make_params(flat).values()) for _ in range(n)], dtype=torch.float64
    )
    assert (ours[:, 0] + ours[:, 2] <= hw[0]).all() and (ours[:, 1] + ours[:, 3] <= hw[1]).all()
    assert (ours >= 0).all() and (ours[:, 2:] > 0).all()

    def stats(b: torch.Tensor) -> torch.Tensor:
        area = b[:, 2] * b[:, 3] / (hw[0] * hw[1])
        whole = (b[:, 2] == hw[0]).double()
        rel_top = b[:, 0] / (hw[0] - b[:, 2] + 1)
        return torch.stack(
            [
                area.mean(),
                area.std(),
                (b[:, 3] / b[:, 2]).log().mean(),
                whole.mean(),
                rel_top.mean(),
            ]
        )

    assert torch.allclose(stats(ours), stats(ref), atol=0.025), (stats(ours), stats(ref))
    area_ours, area_ref = (b[:, 2] * b[:, 3] / (hw[0] * hw[1]) for b in (ours, ref))
    assert ks_distance(area_ours, area_ref) < 0.05


def ks_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = torch.cat([a, b]).unique()
    cdf = lambda s: torch.searchsorted(s.sort().values, grid, right=True).double() / len(s)  # noqa: E731
    return float((cdf(a) - cdf(b)).abs().max())


def test_view_params_probabilities() -> None:
    p = params(image_size=32, blur_prob=0.5, solarize_prob=0.2, color_jitter_strength=0.5)
    vp = G.BatchedSimCLR(p, num_views=2).draw(range(10000), [(32, 32)] * 10000)
    for flag, prob in [
        (vp.flip, 0.5),
        (vp.jitter, 0.8),
        (vp.gray, 0.2),
        (vp.blur, 0.5),
        (vp.solarize, 0.2),
    ]:
        assert abs(flag.double().mean().item() - prob) < 0.015
    low = torch.tensor([0.8, 0.8, 0.8, -0.05])
    high = torch.tensor([1.2, 1.2, 1.2, 0.05])
    f = vp.factors
    assert (f >= low - 1e-6).all() and (f <= high + 1e-6).all()
    assert torch.allclose(f.mean(0), (low + high) / 2, atol=0.01)
    assert (vp.order.sort(dim=1).values == torch.arange(4)).all()  # permutations
    assert torch.allclose(
        torch.bincount(vp.order[:, 0], minlength=4) / 20000.0, torch.full((4,), 0.25), atol=0.015
    )
    assert (vp.sigma >= 0.1).all() and (vp.sigma <= 2.0).all()


# ---------------------------------------------------------------- both paths agree


def test_statistics_match_pil_path(clothing_paths: list[Path], monkeypatch) -> None:
    """Real clothing photos, 240 images x 2 views per path: output colour statistics, flip and
    grayscale rates and the crop-area distribution of the two pipelines agree."""
    data = DataConfig(image_size=48, blur_prob=0.5, solarize_prob=0.2)
    record: dict[str, list[float]] = {"area": [], "flip": [], "gray": []}
    crop_params = v2.RandomResizedCrop.make_params

    def recording_crop(self, flat):  # what the PIL path's RandomResizedCrop drew
        out = crop_params(self, flat)
        h, w = TF.get_size(flat[0])
        record["area"].append(out["height"] * out["width"] / (h * w))
        return out

    def counting(name, transform):
        def wrapped(self, inpt, params):
            record[name][-1] = 1.0
            return transform(self, inpt, params)

        return wrapped

    monkeypatch.setattr(v2.RandomResizedCrop, "make_params", recording_crop)
    for name, cls in (("flip", v2.RandomHorizontalFlip), ("gray", v2.RandomGrayscale)):
        monkeypatch.setattr(cls, "transform", counting(name, cls.transform))
    transform = SimCLRTransform(data)
    torch.manual_seed(0)
    pil_views = []
    for path in clothing_paths:
        image = load_rgb(path)
        for _ in range(2):
            record["flip"].append(0.0)
            record["gray"].append(0.0)
            pil_views.append(transform.view(image))
    pil = torch.stack(pil_views)

    images = [decode_jpeg(read_file(str(p)), mode=ImageReadMode.RGB) for p in clothing_paths]
    views, vp = G.BatchedSimCLR(SimCLRParams.from_config(data))(
        images, range(len(images)), return_params=True
    )
    ours = torch.cat(views)
    assert ours.shape == pil.shape == (2 * len(images), 3, 48, 48) and ours.dtype == pil.dtype

    for stat in (lambda t: t.mean(dim=(0, 2, 3)), lambda t: t.std(dim=(0, 2, 3))):
        assert torch.allclose(stat(ours), stat(pil), atol=0.08), (stat(ours), stat(pil))
    per_view_mean = (ours.mean(dim=(1, 2, 3)).std(), pil.mean(dim=(1, 2, 3)).std())
    assert abs(per_view_mean[0] - per_view_mean[1]) < 0.1

    def grey_fraction(t: torch.Tensor) -> float:
        mean = torch.tensor(data.mean).view(1, 3, 1, 1)
        rgb = t * torch.tensor(data.std).view(1, 3, 1, 1) + mean
        return (rgb.amax(1) - rgb.amin(1)).amax(dim=(1, 2)).lt(1.5 / 255).double().mean().item()

    assert abs(grey_fraction(ours) - grey_fraction(pil)) < 0.07
    n = len(pil_views)
    assert abs(vp.gray.double().mean().item() - np.mean(record["gray"])) < 0.07
    assert abs(vp.flip.double().mean().item() - np.mean(record["flip"])) < 0.09
    sizes = torch.tensor([im.shape[-2:] for im in images] * 2)
    area = (vp.crop_area / sizes.prod(1)).double()
    assert len(record["area"]) == n
    assert ks_distance(area, torch.tensor(record["area"], dtype=torch.float64)) < 0.14


# ---------------------------------------------------------------- determinism, shapes


def test_views_depend_on_seed_only(clothing_paths: list[Path]) -> None:
    images = [decode_jpeg(read_file(str(p)), mode=ImageReadMode.RGB) for p in clothing_paths[:4]]
    aug = G.BatchedSimCLR(params(image_size=32, blur_prob=0.5, solarize_prob=0.5), num_views=3)
    a = aug(images, [7, 8, 9, 10])
    b = aug(images[::-1], [10, 9, 8, 7])  # another batch order, another chunking
    assert len(a) == 3 and all(v.shape == (4, 3, 32, 32) and v.dtype == torch.float32 for v in a)
    for va, vb in zip(a, b):
        assert torch.allclose(va, vb.flip(0), atol=1e-6)
    c = aug(images, [1, 2, 3, 4])
    assert not torch.allclose(a[0], c[0])
    empty = aug([], [])
    assert len(empty) == 3 and empty[0].shape == (0, 3, 32, 32)


@cuda
def test_cuda_decode_and_augment_match_cpu(clothing_paths: list[Path]) -> None:
    aug = G.BatchedSimCLR(params(image_size=64, blur_prob=0.5, solarize_prob=0.2))
    data = [read_file(str(p)) for p in clothing_paths[:16]]
    on_cpu = [decode_jpeg(d, mode=ImageReadMode.RGB) for d in data]
    on_gpu = decode_jpeg(data, mode=ImageReadMode.RGB, device="cuda")
    assert all(g.is_cuda and g.shape == c.shape for g, c in zip(on_gpu, on_cpu))
    views_gpu, views_cpu = aug(on_gpu, range(16)), aug(on_cpu, range(16))
    for g, c in zip(views_gpu, views_cpu):
        assert g.is_cuda and g.dtype == torch.float32 and g.shape == c.shape
        # nvJPEG's IDCT, and no uint8 rounding after the resize: small pixel differences
        assert (g.cpu() - c).abs().mean() < 0.05
        assert torch.allclose(g.cpu().mean(dim=(0, 2, 3)), c.mean(dim=(0, 2, 3)), atol=0.02)


@cuda
def test_cuda_loader(tiny_root: Path) -> None:
    (tiny_root / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    cfg = tensor_cfg(tiny_root, num_workers=2)
    cfg.optim.batch_size = 27  # 81 files, 3 batches
    loader = build_pretrain_loader(cfg, device="cuda")
    set_loader_epoch(loader, 0)
    seen = []
    for views, labels, bad in loader:
        assert all(v.is_cuda and v.shape == (len(labels), 3, 32, 32) for v in views)
        seen += bad
    assert seen == [str(tiny_root / "train" / "cat" / "broken.jpg")]


# ---------------------------------------------------------------- the loader


def test_tensor_loader_contract_and_resume(tiny_root: Path) -> None:
    cfg = tensor_cfg(tiny_root)
    cfg.optim.batch_size = 16
    loader = build_pretrain_loader(cfg)
    assert isinstance(loader, TensorPipelineLoader) and len(loader.dataset.classes) == 10
    set_loader_epoch(loader, 1)
    rng_state = torch.get_rng_state()
    full = epoch_batches(loader)
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert len(full) == 5 == steps_per_epoch(loader) == len(loader)
    views, labels = full[0]
    assert len(views) == 2 and views[0].shape == (16, 3, 32, 32) and views[0].dtype == torch.float32
    assert labels.dtype == torch.long and labels.shape == (16,)
    assert not torch.equal(views[0], views[1])
    assert torch.bincount(torch.cat([y for _, y in full])).tolist() == [8] * 10

    resumed = build_pretrain_loader(cfg)
    set_loader_epoch(resumed, 1, step=2)
    tail = epoch_batches(resumed)
    assert len(tail) == 3
    for (va, ya), (vb, yb) in zip(full[2:], tail):
        assert torch.equal(ya, yb) and all(torch.equal(x, z) for x, z in zip(va, vb))
    set_loader_epoch(resumed, 2)
    assert not torch.equal(epoch_batches(resumed)[0][0][0], full[0][0][0])


def test_tensor_loader_workers_and_device_decode_agree(tiny_root: Path) -> None:
    cfg = tensor_cfg(tiny_root, per_class=4)
    cfg.optim.batch_size = 8
    serial = build_pretrain_loader(cfg)
    cfg.data.num_workers = 2
    parallel = build_pretrain_loader(cfg)
    # the CUDA arrangement (workers read bytes, main process decodes the batch), on the CPU
    main = TensorPipelineLoader(
        serial.dataset.base,
        serial.dataset.indices,
        serial.sampler,
        8,
        serial.augment,
        num_workers=2,
        decode_on_device=True,
    )
    runs = []
    for loader in (serial, parallel, main):
        set_loader_epoch(loader, 0)
        runs.append(epoch_batches(loader))
    for a in runs[1:]:
        assert len(a) == len(runs[0]) == 5
        for (va, ya), (vb, yb) in zip(runs[0], a):
            assert torch.equal(ya, yb) and all(
                torch.allclose(x, z, atol=1e-5) for x, z in zip(va, vb)
            )


def test_tensor_loader_skips_unreadable_and_reads_other_formats(tiny_root: Path) -> None:
    cat = tiny_root / "train" / "cat"
    jpeg = (cat / sorted(p.name for p in cat.iterdir())[0]).read_bytes()
    (cat / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (cat / "empty.jpg").write_bytes(b"")
    (cat / "garbage.png").write_bytes(b"\x89PNG not really")
    photo = load_rgb(cat / sorted(p.name for p in cat.iterdir())[0])
    photo.save(cat / "really_a_png.jpg", format="PNG")
    photo.convert("L").save(cat / "gray.jpg", quality=95)
    photo.convert("CMYK").save(cat / "cmyk.jpg", quality=95)
    Image.new("RGBA", (20, 10), (200, 0, 0, 0)).save(cat / "clear.png")
    bad = sorted(str(cat / n) for n in ("truncated.jpg", "empty.jpg", "garbage.png"))

    for decode_in_main in (False, True):
        cfg = tensor_cfg(tiny_root)
        cfg.optim.batch_size = 29  # 87 files, 3 batches
        loader = build_pretrain_loader(cfg)
        if decode_in_main:
            loader = TensorPipelineLoader(
                loader.dataset.base, None, loader.sampler, 29, loader.augment, decode_on_device=True
            )
        set_loader_epoch(loader, 0)
        seen, count = SkippedImages(), 0
        for views, labels, paths in loader:
            assert views[0].shape == (len(labels), 3, 32, 32)
            count += len(labels)
            seen.add(paths)
        assert count == 84 and sorted(seen.paths) == bad

    ds = EncodedImages(loader.dataset.base)  # decodes on the CPU
    for name in ("really_a_png.jpg", "gray.jpg", "cmyk.jpg", "clear.png"):
        index = next(i for i in range(len(ds)) if ds.base.path(i).endswith("/" + name))
        decoded = ds[index]
        expected = pil_to_tensor(load_rgb(ds.base.path(index)))
        assert decoded.image.dtype == torch.uint8 and decoded.image.shape == expected.shape
        assert (decoded.image.int() - expected.int()).abs().max() <= 2, name


def test_decode_on_device_falls_back_per_image(tiny_root: Path) -> None:
    cfg = tensor_cfg(tiny_root)
    cfg.optim.batch_size = 8
    ds = build_pretrain_loader(cfg).dataset
    ds.decode = False
    items = [ds[i] for i in range(3)]
    broken = items[1]._replace(image=items[1].image[: len(items[1].image) // 2])
    kept, bad = decode_on_device([items[0], broken, items[2]], torch.device("cpu"))
    assert [k.path for k in kept] == [items[0].path, items[2].path] and bad == [broken.path]
    assert all(not k.encoded and k.image.shape == (3, 32, 32) for k in kept)
