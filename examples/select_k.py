"""Choose the number of components by held-out log-likelihood (and BIC/AIC).

python examples/select_k.py [WORKDIR]
"""

from _common import N_SAMPLES, local_client, workdir

import daskem
from daskem.datasets import generate_zarr
from daskem.report import plot_select_k


def main() -> None:
    out = workdir("select-k")
    generate_zarr(out / "data.zarr", N_SAMPLES, 3, 4, seed=2, chunk_rows=max(1000, N_SAMPLES // 10))
    client, cluster = local_client()
    with client, cluster:
        X = daskem.open_array(out / "data.zarr")
        res = daskem.select_k(
            X,
            [2, 3, 4, 5, 6],
            criterion="validation",
            validation_fraction=0.2,
            random_state=0,
            n_init=2,
            init_params="k-means++",
        )
        print(f"{'K':>3} {'validation':>11} {'BIC':>12}")
        for row in res.table:
            print(f"{row['k']:>3} {row['validation_loglik']:>11.4f} {row['bic']:>12.1f}")
        print("best K:", res.best_k)
        plot_select_k(res.table, out / "select_k.png", best_k=res.best_k)
        by_bic = min(res.table, key=lambda r: r["bic"])["k"]
        print("best K by BIC:", by_bic)
        assert by_bic == 4, by_bic  # the data hold 4 components
        assert res.best_k >= 4  # held-out likelihood never prefers too few
    print("select_k ok:", out)


if __name__ == "__main__":
    main()
