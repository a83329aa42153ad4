# Evaluation of the stage-2 model on the window's samples: metrics.json (DVC metrics), per-case figures and
# meshes, training curves of both stages (DVC plots). When no case has a reconstructed surface (a collapsed
# tokenizer)
# `ctvq eval` exits 3 and the job fails; evaluate.allow_collapse: true passes --allow-collapse.


rule evaluate:
    input:
        ckpt=rules.train_stage2.output,
        manifest=f"{RESULTS}/manifests/{{window}}.csv",
        **plan_input(2, PLAN_EVAL),
    output:
        metrics=report(f"{RESULTS}/eval/{{window}}/metrics.json", caption="../report/metrics.rst",
                       category="Evaluation", labels={"window": "{window}", "what": "metrics"}),
        curves_png=report(f"{RESULTS}/eval/{{window}}/training_curves.png", caption="../report/curves.rst",
                          category="Training", labels={"window": "{window}"}),
        figures=report(directory(f"{RESULTS}/eval/{{window}}/figures"), patterns=["{case}.png"],
                       caption="../report/figure.rst", category="Evaluation",
                       labels={"window": "{window}", "case": "{case}"}),
        curves=f"{RESULTS}/curves/{{window}}.csv",  # its own folder: `dvc plots show` draws every file in it
    log:
        "logs/eval/{window}.log",
    benchmark:
        "logs/benchmark/evaluate/{window}.tsv"
    params:
        ctvq=CTVQ,
        out_dir=lambda wc: f"{RESULTS}/eval/{wc.window}",
        train_logs=lambda wc: " ".join(f"{RESULTS}/train/{wc.window}/{stage}/metrics.csv"
                                       for stage in ("stage1", "stage2")),
        allow_collapse="--allow-collapse" if config["evaluate"]["allow_collapse"] else "",
        chunk=EVAL_CHUNK_ARG,
    threads: TRAIN["threads"]
    resources:
        mem_mb=planned_mem_mb("eval_mem_mb", config["evaluate"]["mem_mb"]),
    shell:
        "{params.ctvq} eval --ckpt {input.ckpt} --data {input.manifest} -o {output.metrics} --output-dir {params.out_dir}"
        " --train-log {params.train_logs} --curves-csv {output.curves} {params.allow_collapse}{params.chunk}"
        " > {log} 2>&1"
