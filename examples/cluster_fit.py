"""Fit on a Dask cluster: connect to a scheduler, or start a local one.

    python examples/cluster_fit.py [WORKDIR] [SCHEDULER_ADDRESS]

With an address (e.g. from deploy/local/start-cluster.sh) the fit runs there;
without, a local cluster is started. The model checkpoints every iteration,
so running the script again after an interruption resumes the fit.
"""

import sys

from _common import N_SAMPLES, local_client, workdir
from distributed import Client

import daskem
from daskem.datasets import generate_zarr


def main() -> None:
    out = workdir("cluster")
    generate_zarr(out / "data.zarr", N_SAMPLES, 6, 5, seed=4, chunk_rows=max(1000, N_SAMPLES // 20))
    if len(sys.argv) > 2:
        client, cluster = Client(sys.argv[2]), None
    else:
        client, cluster = local_client()
    try:
        print("dashboard:", client.dashboard_link)
        X = daskem.open_array(out / "data.zarr", chunk_bytes=max(8 * 6 * 500, N_SAMPLES * 6 * 8 // 8))
        print(f"{X.numblocks[0]} row chunks on {len(client.scheduler_info()['workers'])} worker(s)")
        gm = daskem.GaussianMixture(
            n_components=5,
            covariance_type="diag",
            n_init=3,
            random_state=0,
            cache=False,  # stream from Zarr
            checkpoint=out / "checkpoint",
            verbose=1,
        ).fit(X)
        print("BIC:", gm.bic(X), "mean log-likelihood:", gm.score(X))
        gm.save(out / "model")
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    print("cluster fit ok:", out)


if __name__ == "__main__":
    main()
