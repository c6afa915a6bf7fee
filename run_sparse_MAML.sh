#!/usr/bin/env bash
# Reproduce the results table of "Learning where to learn" (von Oswald et al. 2021): one
# train.py run per row, each into its own run folder, then summarise with
# utils/collect_results.py. See docs/reproducing.md.
#
#   ./run_sparse_MAML.sh                                   # every row of both sets, one seed
#   ./run_sparse_MAML.sh --set published                   # the paper's table as published
#   ./run_sparse_MAML.sh --set same-protocol               # all methods under one protocol
#   ./run_sparse_MAML.sh sparse_maml_conv4_5shot maml_conv4_1shot     # the rows named
#   ./run_sparse_MAML.sh --seeds 3 sparse_maml_conv4_5shot            # seeds 0, 1, 2
#   ./run_sparse_MAML.sh --sweep inner.step_size=0.05,0.1,0.25,0.5 sparse_maml_conv4_5shot
#   ./run_sparse_MAML.sh --debug                           # every row, seconds each, on CPU
#   ./run_sparse_MAML.sh --dry-run                         # print the commands only
#   ./run_sparse_MAML.sh sparse_maml_conv4_5shot run.device=cuda:1    # overrides pass through
#   ./run_sparse_MAML.sh --seeds 3 ~/exp/my_variant.yaml               # any config file is a row
#
# Options:
#   --dry-run        print one command per run instead of running it
#   --set NAME       published: each published number under its source's protocol (sparse rows and
#                    the *_protocol baselines); same-protocol: every method under the reference's
#                    protocol; all (default): both. Rows named on the command line replace the set.
#   --debug          append configs/debug.overrides (synthetic data, tiny network, 1 step)
#   --seeds N        run seeds 0..N-1; folders <row>-seed<K>
#   --sweep K=V1,V2  one run per value of the dotted key K; folders <row>-<key>-<V>
#   --out DIR        parent folder of the run folders (default: runs, or runs/debug with --debug)
#   --list           print the row names and exit
# A row is a name from --list (configs/<row>.yaml) or the path of any other YAML config (relative to
# the folder the script is started from; the run is named after the file).
# Anything of the form key=value is passed to every run after the config (it wins over it).
# PYTHON names the interpreter of the runs (default: python from PATH).
# Started again after an interruption, the script skips every run whose folder holds its final
# test result and continues each unfinished one from its newest checkpoint (run.resume=auto).
# A failing run is reported and the others still run; the exit status is 1 if any failed.
# SIGTERM or Ctrl-C stops the current run at its next checkpoint (train.py exits 3); the script
# then reports it as stopped, starts no further run and exits with status 3.

set -euo pipefail

caller=$PWD
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}

# The rows, in table order: configs/<row>.yaml. The sparse rows run the reference's protocol, which
# produced their published numbers, so they belong to both sets.
SPARSE_ROWS=(
  sparse_maml_conv4_5shot sparse_relu_maml_conv4_5shot sparse_maml_conv4_1shot sparse_relu_maml_conv4_1shot
  sparse_maml_resnet12_5shot sparse_relu_maml_resnet12_5shot sparse_maml_resnet12_1shot sparse_relu_maml_resnet12_1shot
  sparse_maml_plus_conv4_5shot sparse_maml_plus_conv4_1shot meta_sgd_conv4_5shot
)
# Each baseline under the protocol of the source its published number is quoted from.
PUBLISHED_ROWS=(
  maml_conv4_5shot_finn_protocol anil_conv4_5shot_raghu_protocol boil_conv4_5shot_boil_protocol
  maml_conv4_1shot_finn_protocol anil_conv4_1shot_raghu_protocol boil_conv4_1shot_boil_protocol
  maml_resnet12_5shot_boil_protocol anil_resnet12_5shot_boil_protocol boil_resnet12_5shot_boil_protocol
  maml_resnet12_1shot_boil_protocol anil_resnet12_1shot_boil_protocol
)
# Each baseline under the reference's protocol: the like-for-like comparison with the sparse rows.
SAME_PROTOCOL_ROWS=(
  maml_conv4_5shot anil_conv4_5shot boil_conv4_5shot maml_conv4_1shot anil_conv4_1shot boil_conv4_1shot
  maml_resnet12_5shot anil_resnet12_5shot boil_resnet12_5shot
  maml_resnet12_1shot anil_resnet12_1shot boil_resnet12_1shot
)
ROWS=("${SPARSE_ROWS[@]}" "${PUBLISHED_ROWS[@]}" "${SAME_PROTOCOL_ROWS[@]}")

# The comment block at the top of this file, without its '#'.
usage() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; }
die() { echo "run_sparse_MAML.sh: $*" >&2; exit 2; }

dry_run=0 debug=0 seeds=0 sweep="" out="" set=all
rows=() overrides=()
# Rows given as the path of a config file: their names and files (indexed arrays: bash 3 has no maps).
file_rows=() file_configs=()
config_of() {
  local i
  for ((i = 0; i < ${#file_rows[@]}; i++)); do
    [[ ${file_rows[i]} == "$1" ]] && { echo "${file_configs[i]}"; return; }
  done
  echo "configs/$1.yaml"
}
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --debug) debug=1 ;;
    --set) [[ ${2:-} =~ ^(published|same-protocol|all)$ ]] || die "--set needs published, same-protocol or all"; set=$2; shift ;;
    --set=*) set=${1#*=}; [[ $set =~ ^(published|same-protocol|all)$ ]] || die "--set needs published, same-protocol or all" ;;
    --seeds) [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || die "--seeds needs a positive integer"; seeds=$2; shift ;;
    --seeds=*) seeds=${1#*=}; [[ $seeds =~ ^[1-9][0-9]*$ ]] || die "--seeds needs a positive integer" ;;
    --sweep) [[ ${2:-} == *=* ]] || die "--sweep needs key=v1,v2,..."; sweep=$2; shift ;;
    --sweep=*) sweep=${1#*=}; [[ $sweep == *=* ]] || die "--sweep needs key=v1,v2,..." ;;
    --out) [[ -n ${2:-} ]] || die "--out needs a folder"; out=$2; shift ;;
    --out=*) out=${1#*=} ;;
    --list) printf '%s\n' "${ROWS[@]}"; exit 0 ;;
    -h|--help) usage; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *=*) overrides+=("$1") ;;
    *)
      row=${1%.yaml}; row=${row#configs/}
      path=$1; [[ $path == /* ]] || path=$caller/$path
      if [[ $row != */* && -f configs/$row.yaml ]]; then
        rows+=("$row")
      elif [[ $1 == *.yaml && -f $path ]]; then
        row=$(basename "$path" .yaml)
        file_rows+=("$row")
        file_configs+=("$(cd "$(dirname "$path")" && pwd)/$(basename "$path")")
        rows+=("$row")
      else
        die "no config configs/$row.yaml, nor a YAML file $1 (rows: ${ROWS[*]})"
      fi ;;
  esac
  shift
done
# Without named rows: the chosen set, each part announced by a comment line.
sets=()
if ((${#rows[@]} == 0)); then
  case $set in
    published) sets=("published: sparse rows and each baseline under its source's protocol") ;;
    same-protocol) sets=("same-protocol: every method under the reference's protocol") ;;
    all) sets=("published: sparse rows and each baseline under its source's protocol"
               "same-protocol: the baselines under the reference's protocol (sparse rows above)") ;;
  esac
fi
[[ -n $out ]] || { ((debug)) && out=runs/debug || out=runs; }

debug_overrides=()
if ((debug)); then
  while IFS= read -r line; do
    line=${line%%#*}; line=${line//[[:space:]]/}
    [[ -n $line ]] && debug_overrides+=("$line")
  done < configs/debug.overrides
fi

sweep_key="" sweep_values=("")
if [[ -n $sweep ]]; then
  sweep_key=${sweep%%=*}
  IFS=, read -r -a sweep_values <<< "${sweep#*=}"
  ((${#sweep_values[@]})) || die "--sweep $sweep has no values"
fi
seed_list=("")
((seeds)) && seed_list=($(seq 0 $((seeds - 1))))

# Quote a command for printing so that it can be pasted back into a shell.
show() {
  local a s=""
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then s+=" $a"; else s+=" '${a//\'/\'\\\'\'}'"; fi
  done
  echo "${s# }"
}

# Continue an unfinished run in its folder, unless the overrides say what to do with it.
resume=("run.resume=auto")
for o in ${overrides[@]+"${overrides[@]}"}; do
  [[ $o == run.overwrite=* || $o == run.resume=* ]] && resume=()
done

# A signal to the script lets the current run stop at its checkpoint (train.py gets it too when
# it is sent to the process group, as Ctrl-C and batch schedulers do); then no further run starts.
stopping=0
trap 'stopping=1' TERM INT

failed=()
run_rows() {
local row value seed name extra dir cmd
for row in "$@"; do
  for value in "${sweep_values[@]}"; do
    for seed in "${seed_list[@]}"; do
      name=$row extra=()
      if [[ -n $sweep_key ]]; then
        name+="-${sweep_key##*.}-$value"
        extra+=("$sweep_key=$value")
      fi
      if [[ -n $seed ]]; then
        name+="-seed$seed"
        extra+=("run.seed=$seed")
      fi
      dir=$out/$name
      cmd=("$PYTHON" train.py -c "$(config_of "$row")" ${debug_overrides[@]+"${debug_overrides[@]}"}
           ${extra[@]+"${extra[@]}"} "run.name=$name" "run.dir=$dir" ${resume[@]+"${resume[@]}"}
           ${overrides[@]+"${overrides[@]}"})
      if ((dry_run)); then
        show "${cmd[@]}"
        continue
      fi
      # train.py's own test record (test.py's have step -1): the run is finished.
      if [[ -f $dir/metrics.jsonl ]] && grep -q '"kind": "test", "step": [0-9]' "$dir/metrics.jsonl"; then
        echo "== $name: done already ($dir), skipped"
        continue
      fi
      if ((stopping)); then
        echo "== stopped before $name; start the script again to continue" >&2
        exit 3
      fi
      echo "== $name"
      show "${cmd[@]}"
      if "${cmd[@]}"; then status=0; else status=$?; fi
      case $status in
        0) ;;
        3) echo "== $name stopped at a checkpoint; start the script again to continue it" >&2
           exit 3 ;;
        4) echo "== $name DIVERGED (see its message above)" >&2; failed+=("$name") ;;
        *) echo "== $name FAILED" >&2; failed+=("$name") ;;
      esac
    done
  done
done
}

if ((${#sets[@]})); then
  for part in "${sets[@]}"; do
    if ((dry_run)); then echo "# set ${part}"; else echo "== set ${part}"; fi
    case $part in
      published*) run_rows "${SPARSE_ROWS[@]}" "${PUBLISHED_ROWS[@]}" ;;
      same-protocol:\ every*) run_rows "${SPARSE_ROWS[@]}" "${SAME_PROTOCOL_ROWS[@]}" ;;
      same-protocol*) run_rows "${SAME_PROTOCOL_ROWS[@]}" ;;
    esac
  done
else
  run_rows "${rows[@]}"
fi

if ((!dry_run)); then
  if ((${#failed[@]})); then
    echo "failed runs: ${failed[*]}" >&2
    exit 1
  fi
  echo "all runs finished; summarise with: $PYTHON utils/collect_results.py $out --out $out"
fi
