# Preprocessing, per case and window: window (and its preview picture) -> sdf -> index; then one manifest per
# window. The per-case steps share the group "case": on a cluster, one case's chain is one job, and
# `--group-components case=N` (the SLURM profiles) packs N chains into one job instead of 3 N jobs of seconds.
# The manifest only reads sample headers: it runs on the submitting node.
# Kept per case and window: the sample (which also holds the CT planes evaluation draws its figures over)
# and the preview. The windowed volume and the band file are temp(): deleted once the sample is written
# (at 512 they are 268 MB and 69 MB a case); `snakemake --notemp` keeps them, e.g. to open them in Slicer.
# --record-failure: an unusable scan leaves a failure record instead of a sample, passed on by sdf and index,
# and the manifest lists the case as `failed: <reason>`; the window's other cases still train.


localrules:
    manifest,


rule phantom:
    output:
        f"{RESULTS}/raw/phantom{{seed}}.nii.gz",
    log:
        "logs/phantom/phantom{seed}.log",
    benchmark:
        "logs/benchmark/phantom/phantom{seed}.tsv"
    params:
        ctvq=CTVQ,
    resources:
        runtime=5,
    group:
        "case"
    shell:
        "{params.ctvq} phantom -o {output} --seed {wildcards.seed} > {log} 2>&1"


rule window:
    input:
        lambda wc: CASES[wc.case],
    output:
        windowed=temp(f"{RESULTS}/windowed/{{window}}/{{case}}.npz"),
        preview=report(f"{RESULTS}/previews/{{window}}/{{case}}.png", caption="../report/preview.rst",
                       category="Previews", subcategory="{window}", labels={"case": "{case}", "window": "{window}"}),
    log:
        "logs/window/{window}/{case}.log",
    benchmark:
        "logs/benchmark/window/{window}/{case}.tsv"
    params:
        ctvq=CTVQ,
        resolution=resolution_of,
        surface=lambda wc: SURFACE_ARGS[wc.window],
        series=lambda wc: f"--series {SERIES[wc.case]}" if wc.case in SERIES else "",
    resources:
        mem_mb=lambda wc: preprocess_mem_mb("window", RESOLUTION[wc.window]),
        runtime=lambda wc: preprocess_runtime_minutes("window", RESOLUTION[wc.window]),
    group:
        "case"
    shell:
        "{params.ctvq} window {input} -o {output.windowed} --preview {output.preview} --window {wildcards.window}"
        " --resolution {params.resolution} --case-id {wildcards.case} {params.surface} {params.series}"
        " --record-failure > {log} 2>&1"


rule sdf:
    input:
        rules.window.output.windowed,
    output:
        temp(f"{RESULTS}/sdf/{{window}}/{{case}}.npz"),
    log:
        "logs/sdf/{window}/{case}.log",
    benchmark:
        "logs/benchmark/sdf/{window}/{case}.tsv"
    params:
        ctvq=CTVQ,
        band=band_of,
    resources:
        mem_mb=lambda wc: preprocess_mem_mb("sdf", RESOLUTION[wc.window]),
        runtime=lambda wc: preprocess_runtime_minutes("sdf", RESOLUTION[wc.window]),
    group:
        "case"
    shell:
        "{params.ctvq} sdf {input} -o {output} --band {params.band} --record-failure > {log} 2>&1"


rule index:
    input:
        rules.sdf.output,
    output:
        f"{RESULTS}/samples/{{window}}/{{case}}.npz",
    log:
        "logs/index/{window}/{case}.log",
    benchmark:
        "logs/benchmark/index/{window}/{case}.tsv"
    params:
        ctvq=CTVQ,
    resources:
        mem_mb=lambda wc: preprocess_mem_mb("index", RESOLUTION[wc.window]),
        runtime=lambda wc: preprocess_runtime_minutes("index", RESOLUTION[wc.window]),
    group:
        "case"
    shell:
        "{params.ctvq} index {input} -o {output} --record-failure > {log} 2>&1"


# The split options are params (changing the split section reruns the manifest); a split file is an input.
rule manifest:
    input:
        samples=lambda wc: expand(rules.index.output, window=wc.window, case=sorted(CASES)),
        split_file=SPLIT_FILES,
    output:
        f"{RESULTS}/manifests/{{window}}.csv",
    log:
        "logs/manifest/{window}.log",
    benchmark:
        "logs/benchmark/manifest/{window}.tsv"
    params:
        ctvq=CTVQ,
        min_points=config["min_points"],
        split=SPLIT_ARGS,
    shell:
        "{params.ctvq} manifest {input.samples} -o {output} --min-points {params.min_points} {params.split}"
        " > {log} 2>&1"
