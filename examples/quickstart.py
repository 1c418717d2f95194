"""Quick start: fit a Gaussian mixture on a Zarr store, out-of-core.

python examples/quickstart.py [WORKDIR]
"""

import dask.array as da
import numpy as np
from _common import N_SAMPLES, local_client, workdir

import daskem
from daskem.datasets import generate_zarr


def main() -> None:
    out = workdir("quickstart")
    truth = generate_zarr(out / "data.zarr", N_SAMPLES, 5, 4, seed=1, chunk_rows=max(1000, N_SAMPLES // 10))
    client, cluster = local_client()
    with client, cluster:
        X = daskem.open_array(out / "data.zarr")  # lazy, chunked along rows
        print(X)
        gm = daskem.GaussianMixture(n_components=4, covariance_type="full", n_init=2, random_state=0, verbose=1)
        gm.fit(X)
        print("converged:", gm.converged_, "after", gm.n_iter_, "iterations; mean log-likelihood", gm.lower_bound_)
        labels = gm.predict(X)  # lazy dask array
        counts = da.bincount(labels, minlength=4).compute()
        print("rows per component:", counts)
        gm.save(out / "model")
        again = daskem.load(out / "model")
        assert np.allclose(again.means_, gm.means_)
        # the true means are found (up to the order of the components)
        err = max(np.min(np.linalg.norm(gm.means_ - m, axis=1)) for m in truth.means)
        print(f"largest distance from a true mean to the nearest fitted mean: {err:.3f}")
        assert err < 0.5
    print("quickstart ok:", out)


if __name__ == "__main__":
    main()
