"""Anomaly detection: flag rows whose log-density is below a training quantile.

python examples/anomaly_detection.py [WORKDIR]
"""

import numpy as np
import zarr
from _common import N_SAMPLES, local_client, workdir

import daskem
from daskem.datasets import generate_zarr


def main() -> None:
    out = workdir("anomaly")
    generate_zarr(out / "train.zarr", N_SAMPLES, 4, 3, seed=3, chunk_rows=max(1000, N_SAMPLES // 10))

    # new data: normal rows from the same mixture plus 1% far-away outliers
    rng = np.random.default_rng(0)
    n_new = max(2_000, N_SAMPLES // 10)
    import json

    from daskem.datasets import MixtureTruth, sample_chunk, truth_path

    truth = MixtureTruth.from_json(json.loads(truth_path(out / "train.zarr").read_text()))
    x_new, _ = sample_chunk(truth, n_new, rng)
    is_outlier = rng.random(n_new) < 0.01
    x_new[is_outlier] += rng.normal(scale=25.0, size=(is_outlier.sum(), 4))
    z = zarr.create_array(store=str(out / "new.zarr"), shape=x_new.shape, chunks=(1000, 4), dtype="f8", overwrite=True)
    z[:] = x_new

    client, cluster = local_client()
    with client, cluster:
        gm = daskem.GaussianMixture(n_components=3, n_init=2, random_state=0).fit(daskem.open_array(out / "train.zarr"))
        # threshold: the 0.5% quantile of the training log-density (on a sample of training rows)
        sample = daskem.open_array(out / "train.zarr")[:: max(1, N_SAMPLES // 20_000)].compute()
        threshold = np.quantile(gm.score_samples(sample), 0.005)
        logd = gm.score_samples(daskem.open_array(out / "new.zarr"))  # lazy
        flags = (logd < threshold).compute()
        caught = flags[is_outlier].mean()
        false_alarms = flags[~is_outlier].mean()
        print(f"threshold log p(x) < {threshold:.3f}: {caught:.0%} of outliers caught, {false_alarms:.2%} false alarms")
        assert caught > 0.9 and false_alarms < 0.03
    print("anomaly detection ok:", out)


if __name__ == "__main__":
    main()
