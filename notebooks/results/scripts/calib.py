import hashlib, json, os, sys, time, platform
import numpy as np, torch, faiss
out = os.environ["OUT"]
info = {"torch": torch.__version__, "faiss": faiss.__version__, "numpy": np.__version__, "gpu": torch.cuda.get_device_name(0),
        "cpus": os.cpu_count()}
try:
    import cv2, skimage; info.update(cv2=cv2.__version__, skimage=skimage.__version__)
except Exception as e:
    info["import_error"] = repr(e)
print(info, flush=True)
from faiss_rqmoe import datasets, RQMoE, RQMoEConfig, train_rqmoe
t = time.time(); x = np.asarray(datasets.default_descriptors(progress=False)); info["sift_build_s"] = time.time() - t
info["sift_shape"] = x.shape; info["sift_sha"] = hashlib.sha256(x.tobytes()).hexdigest()
info["sift_same_as_local"] = info["sift_sha"] == "43db432a65d515dc7f3aa48ee98bc6ef3c2887881c50230451b549f75db9ea0e"
print(info, flush=True)
torch.backends.cuda.matmul.allow_tf32 = True
ds = datasets.load_default(progress=False)
dev = torch.device("cuda")
def sync(): torch.cuda.synchronize()
res = {}
for arch in [dict(n_experts=4, n_layers=2, hidden=256), dict(n_experts=2, n_layers=1, hidden=128)]:
    key = "N{n_experts}L{n_layers}H{hidden}".format(**arch)
    torch.manual_seed(0)
    m = RQMoE(RQMoEConfig(128, 8, 8, **arch), mem_budget_bytes=8 << 30)
    t = time.time()
    h = train_rqmoe(m, ds.xt, ds.xval, max_epochs=1000, time_budget_s=45, batch_size=1024, device="cuda", progress=False,
                    epoch_size=50_000, encode_candidates=32)
    r = {"train45_hist": h.to_dict(), "train_wall": time.time() - t}
    m.to(dev)
    xb = torch.from_numpy(ds.xb[:100_000]).to(dev)
    for A in (None, 64, 32, 16):
        m.encode(xb[:2000], A); sync(); t = time.time(); codes = m.encode(xb[:50_000], A); sync()
        r[f"encode_vps_A{A}"] = 50_000 / (time.time() - t)
        rec = m.decode(codes).cpu().numpy(); r[f"mse_A{A}"] = float(((rec - ds.xb[:50_000]) ** 2).sum(1).mean())
    codes = m.encode(xb, 32)
    for bs in (1024, 100_000):
        c = codes[:bs]
        for name, fn in (("par", m.decode), ("seq", m.decode_sequential)):
            fn(c); sync(); t = time.time()
            for _ in range(5): fn(c)
            sync(); r[f"decode_{name}_vps_bs{bs}"] = 5 * len(c) / (time.time() - t)
    print(key, {k: v for k, v in r.items() if k != "train45_hist"}, r["train45_hist"]["val_mse"], flush=True)
    res[key] = r
info["res"] = res
json.dump(info, open(f"{out}/calib.json", "w"), indent=1, default=str)
