"""pyRadPlan side of ``bench/tg119_vs_pyradplan.py``: pyRadPlan's own TG-119 photon example, timed.

Runs INSIDE the separate environment ``bench/.venv-pyradplan`` (pyRadPlan 0.5.0 and its own numpy,
scipy and numba); it never imports TwinRT. ``bench/tg119_vs_pyradplan.py`` starts it as a subprocess.

The plan is pyRadPlan's example (``examples/intro_minimal_photons.py`` and
``examples/pencilbeam_photon.py``) with the TG-119 settings of the issue:

* ``load_tg119()`` (pyRadPlan's own phantom; identical to the shared ``tg119.npz``),
* ``PhotonPlan(machine="Generic")``, 9 coplanar beams at gantry 0, 40, ..., 320 deg, couch 0, 5 mm bixels,
* ``calc_dose_influence`` with the default engine (SVD pencil beam, all settings at their defaults)
  on a 3 mm dose grid (``{"dose_grid": {"resolution": {"x": 3, "y": 3, "z": 3}}}``),
* ``fluence_optimization`` with SciPy L-BFGS-B at its default cap of 500 iterations and the objectives
  OuterTarget squared deviation 50 Gy (priority 1000), Core squared overdose 25 Gy (300), BODY squared
  overdose 30 Gy (100).

Timings use ``time.perf_counter``: ``dij_s`` is ``calc_dose_influence`` alone (STF generation is
reported separately as ``stf_s``), ``opt_s`` is ``fluence_optimization`` alone, ``total_s`` is from
``load_tg119`` to the optimised dose on the dose grid (load + stf + dij + opt + dose).

DVH figures (``*_d95_gy`` etc.) are evaluated ON THE DOSE GRID: the CT-grid masks of ``tg119.npz``'s
structures (pyRadPlan's CST masks, which are identical) are resampled nearest-neighbour to the dose
grid, and ``DX = np.percentile(dose[mask], 100 - X)``. This is the dose-grid convention of
the shared data README (``../shared/data/README.md``, tg119 section). ``bench/tg119_vs_pyradplan.py``
imports ``dose_grid_nearest_masks`` and ``dvh_figures`` from this file, so both systems are evaluated
by the same code. The CT-grid figures of pyRadPlan's own example
(``dij.compute_result_ct_grid``, SimpleITK linear) are also written, under ``ct_grid_dvh``, for reference.

Usage (inside the env)::

    bench/.venv-pyradplan/bin/python bench/pyradplan_tg119_runner.py OUT.json [--npz OUT.npz] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out_json", help="where to write the JSON of figures")
    p.add_argument("--npz", help="where to write the optimised dose, weights and rays (default: OUT_JSON with .npz)")
    p.add_argument("--threads", type=int, default=None, help="numba/BLAS threads (default: all cores)")
    p.add_argument("--dose-grid-mm", type=float, default=3.0, help="isotropic dose-grid resolution (mm)")
    p.add_argument("--max-iter", type=int, default=None, help="override the L-BFGS-B iteration cap (default: pyRadPlan's 500)")
    return p.parse_args()


THREAD_VARS = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

if __name__ == "__main__":
    ARGS = _parse()
    if ARGS.threads:
        # Must be set before numpy / numba are imported.
        for var in THREAD_VARS:
            os.environ[var] = str(ARGS.threads)
    # pyRadPlan's per-beam/per-ray tqdm bars would flood the caller's log; its figures are printed below.
    os.environ.setdefault("TQDM_DISABLE", "1")

import logging  # noqa: E402

import numpy as np  # noqa: E402

GANTRY_DEG = [float(g) for g in np.linspace(0.0, 360.0, 9, endpoint=False)]  # 0, 40, ..., 320
BIXEL_MM = 5.0
OBJECTIVES = {  # name -> (class, priority, dose Gy), the ones stored in pyRadPlan's TG119.mat
    "OuterTarget": ("SquaredDeviation", 1000.0, 50.0),
    "Core": ("SquaredOverdosing", 300.0, 25.0),
    "BODY": ("SquaredOverdosing", 100.0, 30.0),
}
METRICS = {"D98": 98, "D95": 95, "D50": 50, "D5": 5, "D2": 2}


def log(msg: str) -> None:
    print(f"[pyradplan-runner] {msg}", file=sys.stderr, flush=True)


def dose_grid_nearest_masks(masks_zyx: dict, ct_origin, ct_spacing, dg_origin, dg_spacing, dg_shape_zyx) -> dict:
    """Resample CT-grid masks (z, y, x) nearest-neighbour to a dose grid (both axis-aligned, identity direction).

    Each dose-grid voxel centre takes the mask value of the CT voxel whose centre is nearest (rounding the
    continuous CT index); dose voxels whose centre lies outside the CT grid are False. Origins and spacings
    are (x, y, z) in mm, shapes (z, y, x).
    """
    ct_shape_zyx = next(iter(masks_zyx.values())).shape
    sel = []  # per array axis (z, y, x): CT index of every dose-grid plane, and whether it is inside
    for axis_zyx, axis_xyz in ((0, 2), (1, 1), (2, 0)):
        centres = dg_origin[axis_xyz] + dg_spacing[axis_xyz] * np.arange(dg_shape_zyx[axis_zyx])
        i = np.rint((centres - ct_origin[axis_xyz]) / ct_spacing[axis_xyz]).astype(np.int64)
        sel.append((i, (i >= 0) & (i < ct_shape_zyx[axis_zyx])))
    (iz, vz), (iy, vy), (ix, vx) = sel
    out = {}
    for name, m in masks_zyx.items():
        r = np.zeros(tuple(int(s) for s in dg_shape_zyx), dtype=bool)
        r[np.ix_(vz, vy, vx)] = m[np.ix_(iz[vz], iy[vy], ix[vx])]
        out[name] = r
    return out


def dvh_figures(dose: np.ndarray, mask: np.ndarray) -> dict:
    v = np.asarray(dose, dtype=np.float64)[mask]
    out = {"n": int(v.size)}
    if v.size == 0:
        return out
    out.update({f"{k}_gy": float(np.percentile(v, 100 - x)) for k, x in METRICS.items()})
    out.update({"mean_gy": float(v.mean()), "max_gy": float(v.max()), "min_gy": float(v.min())})
    return out


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING)
    import scipy
    import SimpleITK as sitk
    import pydantic
    import numba

    import pyRadPlan
    from pyRadPlan import PhotonPlan, calc_dose_influence, fluence_optimization, generate_stf, load_tg119
    from pyRadPlan.optimization import objectives as prp_obj

    versions = {
        "pyradplan": getattr(pyRadPlan, "__version__", None),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "numba": numba.__version__,
        "SimpleITK": sitk.Version_VersionString(),
        "pydantic": pydantic.VERSION,
    }
    if not versions["pyradplan"]:
        from importlib.metadata import version

        versions["pyradplan"] = version("pyradplan")
    threads = {"requested": args.threads, "numba": numba.config.NUMBA_NUM_THREADS, "cpu_count": os.cpu_count()}
    log(f"versions {versions}; threads {threads}")

    load_before = os.getloadavg()  # other processes on the cores make every timing below longer
    t_start = time.perf_counter()
    ct, cst = load_tg119()
    t_load = time.perf_counter() - t_start

    pln = PhotonPlan(machine="Generic")
    pln.prop_stf = {
        "gantry_angles": GANTRY_DEG,
        "couch_angles": [0.0] * len(GANTRY_DEG),
        "bixel_width": BIXEL_MM,
    }
    g = args.dose_grid_mm
    pln.prop_dose_calc = {"dose_grid": {"resolution": {"x": g, "y": g, "z": g}}}
    solver = {"name": "scipy"}
    if args.max_iter is not None:
        solver["max_iter"] = args.max_iter
    pln.prop_opt = {"solver": solver}

    names = [v.name for v in cst.vois]
    for voi in cst.vois:
        if voi.name not in OBJECTIVES:
            voi.objectives = []
            continue
        cls, prio, d = OBJECTIVES[voi.name]
        kw = {"d_ref": d} if cls == "SquaredDeviation" else {"d_max": d}
        voi.objectives = [getattr(prp_obj, cls)(priority=prio, **kw)]
    missing = sorted(set(OBJECTIVES) - set(names))
    if missing:
        raise SystemExit(f"pyRadPlan's TG-119 has no structure(s) {missing}; found {names}")

    t0 = time.perf_counter()
    stf = generate_stf(ct, cst, pln)
    t_stf = time.perf_counter() - t0
    n_rays = [int(b.num_of_rays) for b in stf.beams]
    log(f"stf: {sum(n_rays)} bixels {n_rays} in {t_stf:.2f} s; computing dij on a {g} mm grid ...")

    t0 = time.perf_counter()
    dij = calc_dose_influence(ct, cst, stf, pln)
    t_dij = time.perf_counter() - t0
    mat = dij.physical_dose.flat[0]
    nnz = int(mat.nnz)
    dij_bytes = int(mat.data.nbytes + mat.indices.nbytes + mat.indptr.nbytes)
    log(f"dij: {t_dij:.1f} s, {type(mat).__name__} {mat.shape} {mat.dtype}, nnz {nnz:,}, {dij_bytes / 2**30:.3f} GiB; optimising ...")

    opt_info: dict = {}
    t0 = time.perf_counter()
    w = fluence_optimization(ct, cst, stf, dij, pln, opt_info=opt_info)
    t_opt = time.perf_counter() - t0
    w = np.asarray(w, dtype=np.float64)

    t0 = time.perf_counter()
    dose = np.asarray(mat @ w, dtype=np.float64)
    t_dose = time.perf_counter() - t0
    t_total = time.perf_counter() - t_start
    log(f"opt: {t_opt:.1f} s ({opt_info.get('num_iter')} iterations); total {t_total:.1f} s")

    dg = dij.dose_grid
    dg_shape_zyx = tuple(int(s) for s in dg.dimensions[::-1])
    dg_origin = np.asarray(dg.origin, dtype=float)
    dg_spacing = np.asarray(dg.resolution_vector, dtype=float)
    if not np.allclose(np.asarray(dg.direction, dtype=float).reshape(3, 3), np.eye(3)):
        raise SystemExit("pyRadPlan's dose grid is not axis-aligned; the evaluation below assumes it is")
    dose_zyx = dose.reshape(dg_shape_zyx)  # pyRadPlan stores voxels in sitk (z, y, x) C order

    ct_origin = np.asarray(ct.grid.origin, dtype=float)
    ct_spacing = np.asarray(ct.grid.resolution_vector, dtype=float)
    ct_masks = {}
    for voi in cst.vois:
        m = np.asarray(sitk.GetArrayFromImage(voi.mask)).astype(bool)  # (z, y, x)
        ct_masks[voi.name] = m
    dg_masks = dose_grid_nearest_masks(ct_masks, ct_origin, ct_spacing, dg_origin, dg_spacing, dg_shape_zyx)
    dvh_dose_grid = {n: dvh_figures(dose_zyx, dg_masks[n]) for n in OBJECTIVES}

    # pyRadPlan's own example evaluates on the CT grid (SimpleITK linear); kept for reference only.
    res_ct = dij.compute_result_ct_grid(w)
    dose_ct = sitk.GetArrayFromImage(res_ct["physical_dose"]).astype(np.float64)
    dvh_ct_grid = {n: dvh_figures(dose_ct, ct_masks[n]) for n in OBJECTIVES}

    result_info = opt_info.get("result_info") or {}
    obj_hist = opt_info.get("obj_history") or []
    out = {
        "system": "pyRadPlan",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "versions": versions,
        "threads": threads,
        "loadavg_1_5_15": {"before": list(load_before), "after": list(os.getloadavg())},
        "plan": {
            "gantry_deg": GANTRY_DEG,
            "couch_deg": [0.0] * len(GANTRY_DEG),
            "bixel_width_mm": BIXEL_MM,
            "dose_grid_mm": g,
            "engine": "SVDPB (PhotonPencilBeamSVDEngine), pyRadPlan's default, default settings",
            "objectives": {k: list(v) for k, v in OBJECTIVES.items()},
            "solver": "scipy L-BFGS-B",
            "max_iter": args.max_iter if args.max_iter is not None else 500,
        },
        "isocenter_mm_xyz": [float(v) for v in np.asarray(stf.beams[0].iso_center, dtype=float).reshape(-1)],
        "n_bixels": int(w.size),
        "rays_per_beam": n_rays,
        "timings_s": {
            "load_s": t_load,
            "stf_s": t_stf,
            "dij_s": t_dij,
            "opt_s": t_opt,
            "dose_s": t_dose,
            "total_s": t_total,
        },
        "dij": {
            "format": type(mat).__name__,
            "dtype": str(mat.dtype),
            "shape": [int(s) for s in mat.shape],
            "nnz": nnz,
            "nbytes": dij_bytes,
            "gib": dij_bytes / 2**30,
        },
        "optimizer": {
            "num_iter": opt_info.get("num_iter"),
            "status": str(result_info.get("message", result_info.get("status", ""))),
            "objective_first": float(obj_hist[0]) if obj_hist else None,
            "objective_last": float(obj_hist[-1]) if obj_hist else None,
            "n_evaluations": len(obj_hist),
        },
        "dose_grid": {
            "origin_mm_xyz": dg_origin.tolist(),
            "spacing_mm_xyz": dg_spacing.tolist(),
            "shape_zyx": list(dg_shape_zyx),
        },
        "evaluation": "dose grid; CT-grid masks resampled nearest-neighbour to the dose grid; DX = percentile(100 - X)",
        "dvh": dvh_dose_grid,
        "ct_grid_dvh": dvh_ct_grid,
        "outer_target_d95_gy": dvh_dose_grid["OuterTarget"]["D95_gy"],
        "core_d5_gy": dvh_dose_grid["Core"]["D5_gy"],
        "max_weight": float(w.max()),
        "n_weights_gt_1e-6": int((w > 1e-6).sum()),
    }

    npz_path = args.npz or os.path.splitext(args.out_json)[0] + ".npz"
    ray_bev = []
    ray_iso = []
    bixel_beam = []
    for b_idx, beam in enumerate(stf.beams):
        for ray in beam.rays:
            ray_bev.append(np.asarray(ray.ray_pos_bev, dtype=float).reshape(3))
            ray_iso.append(np.asarray(ray.ray_pos, dtype=float).reshape(3))
            bixel_beam.append(b_idx)
    iso = np.asarray(stf.beams[0].iso_center, dtype=float).reshape(3)
    np.savez_compressed(
        npz_path,
        dose_gy=dose_zyx.astype(np.float32),
        dose_grid_origin_mm_xyz=dg_origin,
        dose_grid_spacing_mm_xyz=dg_spacing,
        dose_grid_shape_zyx=np.asarray(dg_shape_zyx, dtype=np.int32),
        bixel_weight=w,
        bixel_beam=np.asarray(bixel_beam, dtype=np.int16),
        bixel_ray_bev_mm=np.asarray(ray_bev),
        bixel_ray_iso_plane_mm_xyz=np.asarray(ray_iso) + iso,
        rays_per_beam=np.asarray(n_rays, dtype=np.int32),
        gantry_deg=np.asarray([b.gantry_angle for b in stf.beams], dtype=float),
        couch_deg=np.asarray([b.couch_angle for b in stf.beams], dtype=float),
        isocenter_mm_xyz=iso,
        sad_mm=float(stf.beams[0].sad),
        bixel_width_mm=BIXEL_MM,
        meta_json=json.dumps(out),
    )
    out["npz"] = os.path.abspath(npz_path)
    with open(args.out_json, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    log(f"wrote {args.out_json} and {npz_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
