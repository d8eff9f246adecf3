"""Seconds per NTK-SAP scoring call (= one pruning iteration) on an accelerator, vmap vs sequential sample loop.

One JSON line per (model, sample loop) to stdout and to ``$OUT/gpu_bench.jsonl`` (``$OUT`` defaults
to /tmp): compile seconds (first call minus a steady call), median steady seconds, peak device bytes.
Settings are the official ones per benchmark: ResNet-20/CIFAR-10 R=5 x 100 inputs; VGG-16/CIFAR-100
R=1 x 1,000 inputs; ResNet-50/ImageNet R=1 x 10,000 inputs; batches of 256.

    python benchmarks/gpu_score_speed.py                     # all three
    python benchmarks/gpu_score_speed.py resnet20-cifar10    # one
    SMOKE=1 python benchmarks/gpu_score_speed.py             # tiny sizes, to check it runs (CPU)

Results measured on an NVIDIA H200 (jax 0.11.2): benchmarks/results/ntksap_score_h200_2026-11-26.jsonl.
The vmap loop on ResNet-50 (40 weight samples of 256 images at once) did not finish within the run's
limit and was stopped; use the sequential loop there.
"""
import json, os, statistics, sys, time
import jax, jax.numpy as jnp
sys.path.insert(0, os.getcwd())
from ntksap_jax import get_model, init_masks, ntksap_scorer
from ntksap_jax.models import get_model as gm
out = open(os.path.join(os.environ.get("OUT", "/tmp"), "gpu_bench.jsonl"), "a")
def log(d):
    d["device"] = str(jax.devices()[0]); print(json.dumps(d), flush=True); out.write(json.dumps(d) + "\n"); out.flush()
log({"jax": jax.__version__, "backend": jax.default_backend()})
CONFIGS = [
  # name, model, kwargs, shape, classes, samples R, num_inputs, batch, loops, steady repeats
  ("resnet20-cifar10", "resnet20", {}, (32,32,3), 10, 5, 100, 256, ["vmap", "sequential"], 5),
  ("vgg16-cifar100", "vgg16", {}, (32,32,3), 100, 1, 1000, 256, ["vmap", "sequential"], 3),
  ("resnet50-imagenet", "resnet50", {"stem": "imagenet"}, (224,224,3), 1000, 1, 10000, 256, ["sequential", "vmap"], 1),
]
only = sys.argv[1:]
if os.environ.get("SMOKE"):
    CONFIGS = [(c[0], c[1], c[2], (16,16,3) if c[3][0]==32 else (64,64,3), c[4], 1, 4, 4, c[8][:1], 1) for c in CONFIGS]
for name, mname, kw, shape, classes, R, n, bs, loops, reps in CONFIGS:
    if only and name not in only: continue
    model = gm(mname, classes, **kw)
    v = jax.jit(lambda k: model.init(k, jnp.zeros((1, *shape)), train=False))(jax.random.key(0))
    params, bstats = v["params"], v.get("batch_stats")
    masks = init_masks(params)
    for loop in loops:
        try:
            score = ntksap_scorer(model, shape, samples=R, num_inputs=n, batch_size=bs, sample_loop=loop)
            t0 = time.perf_counter(); jax.block_until_ready(score(params, masks, bstats, jax.random.key(1))); first = time.perf_counter() - t0
            ts = []
            for r in range(reps):
                t0 = time.perf_counter(); jax.block_until_ready(score(params, masks, bstats, jax.random.key(2 + r))); ts.append(time.perf_counter() - t0)
            log({"config": name, "loop": loop, "R": R, "num_inputs": n, "batch": bs, "first_s": first,
                 "steady_median_s": statistics.median(ts), "steady_all": ts, "compile_s_est": first - statistics.median(ts),
                 "peak_gpu_bytes": (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")})
        except Exception as e:
            log({"config": name, "loop": loop, "error": f"{type(e).__name__}: {str(e)[:300]}"})
