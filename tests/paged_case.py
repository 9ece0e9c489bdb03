"""A random paged attention case shared by the backend tests."""

import torch

import kvlayout as kvl


def paged_case(rng, *, hq, hkv, d, bs, reqs, dtype, device, cross=False, pad=0, q_dtype=None, other_fill=300.0):
    """A cache holding every request's history in random block order, the step's metadata and queries (plus
    ``pad`` rows no request owns). ``reqs`` are ``(computed, new)`` pairs. With ``cross`` the layer is a
    cross-layer view beside a layer filled with ``other_fill``, so reading the wrong layer shows."""
    spec = kvl.AttentionSpec(hkv, d, dtype, bs)
    need = [-(-(c + n) // bs) for c, n in reqs]
    nb = sum(need) + 2
    specs = {"other": spec, "me": spec} if cross else {"me": spec}
    caches = kvl.allocate_kv_cache(kvl.resolve_kv_cache_layout(specs, nb, cross_layer=cross), device)
    cache = caches["me"]
    cache.copy_(torch.randn(cache.shape, generator=rng).to(device).to(dtype))
    if cross:
        caches["other"].fill_(other_fill)
    ids = torch.randperm(nb, generator=rng).tolist()
    sched, at = [], 0
    for (c, n), k in zip(reqs, need):
        sched.append(kvl.ScheduledRequest(c, n, ids[at:at + k]))
        at += k
    meta = kvl.build_attention_metadata(sched, bs, device, num_blocks=nb)
    q = torch.randn(meta.num_actual_tokens + pad, hq, d, generator=rng).to(device).to(q_dtype or dtype)
    return cache, meta, q
