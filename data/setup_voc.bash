#!/usr/bin/env bash
# Download and lay out PASCAL VOC 2012 + the SBD-augmented masks, or verify such a tree.
#
#   bash data/setup_voc.bash DATA_DIR [--keep-archives]   download, verify, extract (resumable)
#   bash data/setup_voc.bash DATA_DIR --check [--expect-full]
#
# DATA_DIR becomes the dataset root that DATA.ROOT points to:
#   DATA_DIR/JPEGImages/<id>.jpg  Annotations/<id>.xml  SegmentationClass/  SegmentationObject/
#   DATA_DIR/SegmentationClassAug/<id>.png        (greyscale index PNGs, 255 = void)
#   DATA_DIR/ImageSets/Segmentation/{train,val,trainval,train_aug}.txt
#   DATA_DIR/BgMaskfromBoxes/<id>.png             (written by data/voc_bbox_setup.py, next step)
#
# Steps (each is skipped when its marker DATA_DIR/.setup/<step>.done exists, so a rerun is cheap):
#   1. VOCtrainval_11-May-2012.tar from the official host, md5-checked, extracted.
#   2. SegmentationClassAug.zip, the archive of SBD-augmented labels most VOC segmentation code
#      uses (12,031 PNGs: train_aug + val). No checksum of it is published that we could verify,
#      so none is invented here: the zip is tested with `unzip -t` and the PNGs are counted.
#   3. train_aug.txt = the SegmentationClassAug ids minus the val ids. This reproduces the usual
#      10,582-image list (VOC train + SBD train/val, without VOC val) without a third download.
# Downloads go to DATA_DIR/.setup/ and resume where they stopped (curl -C - or wget -c); archives
# are deleted after extraction unless --keep-archives.
#
# --check only verifies a tree (nothing is downloaded): the folders and split lists exist, every
# listed id has its image, annotation, SegmentationClassAug mask and background mask, and
# train_aug does not overlap val. It works on any VOC-layout tree, e.g. the synthetic one of
# data/synthetic.py. --expect-full also demands the real VOC counts (17,125 images and
# annotations, 12,031 augmented masks, train_aug 10,582, train 1,464, val 1,449).
# Exit status: 0 fine, 1 a check or a download failed (the message says which), 2 bad usage.

set -euo pipefail
export LC_ALL=C  # one collation for sort and comm

VOC_URL="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
VOC_TAR="VOCtrainval_11-May-2012.tar"
VOC_MD5="6cd6e144f989b92b3379bac3b3de84fd"  # the md5 torchvision's VOCSegmentation checks
AUG_URL="https://www.dropbox.com/s/oeu149j8qtbs1x0/SegmentationClassAug.zip?dl=1"
AUG_ZIP="SegmentationClassAug.zip"

usage() {
    echo "usage: bash data/setup_voc.bash DATA_DIR [--keep-archives] | DATA_DIR --check [--expect-full]" >&2
    exit 2
}

say() { echo "[setup_voc] $*"; }
fail() { echo "[setup_voc] error: $*" >&2; exit 1; }

DATA_DIR=""
CHECK=0
EXPECT_FULL=0
KEEP=0
for arg in "$@"; do
    case "$arg" in
        --check) CHECK=1 ;;
        --expect-full) EXPECT_FULL=1 ;;
        --keep-archives) KEEP=1 ;;
        -h|--help) usage ;;
        -*) echo "[setup_voc] unknown option $arg" >&2; usage ;;
        *) [[ -z "$DATA_DIR" ]] || usage; DATA_DIR="$arg" ;;
    esac
done
[[ -n "$DATA_DIR" ]] || usage
if [[ $EXPECT_FULL -eq 1 && $CHECK -eq 0 ]]; then
    echo "[setup_voc] --expect-full goes with --check" >&2
    usage
fi

# Ids of a split list, one per line. A DeepLab-style line "/JPEGImages/<id>.jpg /Seg.../<id>.png"
# gives the id of its first path, as data/voc.py reads it.
list_ids() {
    awk 'NF { print $1 }' "$1" | sed -e 's#.*/##' -e 's#\.[A-Za-z]*$##' | sort -u
}

# Ids of the files with extension $2 in folder $1.
dir_ids() {
    [[ -d "$1" ]] || return 0
    find "$1" -maxdepth 1 -type f -name "*.$2" | sed -e 's#.*/##' -e "s#\.$2\$##" | sort -u
}

count_lines() { grep -c . || true; }

check_tree() {
    local root="$1" need_bg="$2" problems=0
    report() { echo "[setup_voc] check failed: $*" >&2; problems=$((problems + 1)); }
    if [[ ! -d "$root" ]]; then
        report "$root does not exist: run 'bash data/setup_voc.bash $root' or 'python data/synthetic.py --out $root'"
        return 1
    fi
    local dirs=(JPEGImages Annotations SegmentationClassAug ImageSets/Segmentation)
    [[ "$need_bg" -eq 1 ]] && dirs+=(BgMaskfromBoxes)
    for d in "${dirs[@]}"; do
        [[ -d "$root/$d" ]] || report "folder $root/$d is missing"
    done
    local tmp
    tmp="$(mktemp -d)"
    dir_ids "$root/JPEGImages" jpg >"$tmp/jpg"
    dir_ids "$root/Annotations" xml >"$tmp/xml"
    dir_ids "$root/SegmentationClassAug" png >"$tmp/aug"
    dir_ids "$root/BgMaskfromBoxes" png >"$tmp/bg"
    for split in train val train_aug; do
        local list="$root/ImageSets/Segmentation/$split.txt"
        if [[ ! -s "$list" ]]; then
            report "split list $list is missing or empty"
            continue
        fi
        list_ids "$list" >"$tmp/$split"
        local n
        n=$(count_lines <"$tmp/$split")
        say "$split: $n ids"
        local kinds=("jpg:JPEGImages/<id>.jpg" "xml:Annotations/<id>.xml" "aug:SegmentationClassAug/<id>.png")
        [[ "$need_bg" -eq 1 ]] && kinds+=("bg:BgMaskfromBoxes/<id>.png")
        for kind in "${kinds[@]}"; do
            local key="${kind%%:*}" what="${kind#*:}" missing
            missing=$(comm -23 "$tmp/$split" "$tmp/$key" | count_lines)
            if [[ "$missing" -gt 0 ]]; then
                local example
                example=$(comm -23 "$tmp/$split" "$tmp/$key" | head -n 1)
                local fix="rerun 'bash data/setup_voc.bash $root'"
                [[ "$key" == bg ]] && fix="run 'python data/voc_bbox_setup.py --data-root $root'"
                report "$missing ids of $split.txt lack $what, e.g. $root/${what/<id>/$example}: $fix"
            fi
        done
    done
    if [[ -f "$tmp/train_aug" && -f "$tmp/val" ]]; then
        local overlap
        overlap=$(comm -12 "$tmp/train_aug" "$tmp/val" | count_lines)
        [[ "$overlap" -eq 0 ]] || report "$overlap ids are in both train_aug.txt and val.txt (val would leak into training)"
    fi
    if [[ "$EXPECT_FULL" -eq 1 ]]; then
        local expect=("jpg:17125:JPEGImages/*.jpg" "xml:17125:Annotations/*.xml"
                      "aug:12031:SegmentationClassAug/*.png" "train_aug:10582:train_aug.txt ids"
                      "train:1464:train.txt ids" "val:1449:val.txt ids")
        for item in "${expect[@]}"; do
            IFS=: read -r key want what <<<"$item"
            local have=0
            [[ -f "$tmp/$key" ]] && have=$(count_lines <"$tmp/$key")
            [[ "$have" -eq "$want" ]] || report "$what: found $have, expected $want for the full VOC 2012 + SBD"
        done
    fi
    rm -rf "$tmp"
    if [[ $problems -gt 0 ]]; then
        echo "[setup_voc] $root: $problems problem(s), see above" >&2
        return 1
    fi
    say "$root: tree is consistent"
}

if [[ $CHECK -eq 1 ]]; then
    check_tree "$DATA_DIR" 1 || exit 1
    exit 0
fi

md5_of() {
    if command -v md5sum >/dev/null; then md5sum "$1" | awk '{ print $1 }'; else md5 -q "$1"; fi
}

# download URL FILE: resumes a partial FILE.
download() {
    local url="$1" out="$2"
    say "downloading $url -> $out (resumes a partial file)"
    if command -v curl >/dev/null; then
        curl -fL --retry 3 -C - -o "$out" "$url" || fail "download of $url failed; rerun to resume, or delete $out to start over"
    elif command -v wget >/dev/null; then
        wget -c -O "$out" "$url" || fail "download of $url failed; rerun to resume, or delete $out to start over"
    else
        fail "neither curl nor wget is installed"
    fi
}

STATE="$DATA_DIR/.setup"
mkdir -p "$STATE"

if [[ -f "$STATE/voc2012.done" ]]; then
    say "step 1/3: VOC 2012 trainval already extracted, skipping"
else
    say "step 1/3: VOC 2012 trainval (about 2 GB)"
    archive="$STATE/$VOC_TAR"
    if [[ ! -f "$archive" || "$(md5_of "$archive")" != "$VOC_MD5" ]]; then
        download "$VOC_URL" "$archive"
    fi
    say "checking md5 of $archive"
    got="$(md5_of "$archive")"
    if [[ "$got" != "$VOC_MD5" ]]; then
        rm -f "$archive"
        fail "$archive has md5 $got, expected $VOC_MD5: the file was corrupt and is deleted; rerun to download it again"
    fi
    say "extracting into $DATA_DIR"
    tar -xf "$archive" -C "$DATA_DIR" --strip-components=2 VOCdevkit/VOC2012
    touch "$STATE/voc2012.done"
    [[ $KEEP -eq 1 ]] || rm -f "$archive"
fi

if [[ -f "$STATE/segaug.done" ]]; then
    say "step 2/3: SegmentationClassAug already extracted, skipping"
else
    say "step 2/3: SegmentationClassAug (SBD-augmented masks)"
    archive="$STATE/$AUG_ZIP"
    if [[ ! -f "$archive" ]] || ! unzip -tq "$archive" >/dev/null 2>&1; then
        download "$AUG_URL" "$archive"
    fi
    say "testing $archive"
    if ! unzip -tq "$archive" >/dev/null; then
        rm -f "$archive"
        fail "$archive is corrupt and is deleted; rerun to download it again"
    fi
    rm -rf "$DATA_DIR/SegmentationClassAug"
    unzip -q -o "$archive" 'SegmentationClassAug/*' -d "$DATA_DIR"
    n=$(dir_ids "$DATA_DIR/SegmentationClassAug" png | count_lines)
    [[ "$n" -eq 12031 ]] || fail "$DATA_DIR/SegmentationClassAug holds $n PNGs, expected 12031: delete $archive and rerun"
    touch "$STATE/segaug.done"
    [[ $KEEP -eq 1 ]] || rm -f "$archive"
fi

say "step 3/3: ImageSets/Segmentation/train_aug.txt = SegmentationClassAug ids minus val ids"
lists="$DATA_DIR/ImageSets/Segmentation"
tmp_list="$(mktemp "$lists/.train_aug.XXXXXX")"
comm -23 <(dir_ids "$DATA_DIR/SegmentationClassAug" png) <(list_ids "$lists/val.txt") >"$tmp_list"
chmod 644 "$tmp_list"
mv "$tmp_list" "$lists/train_aug.txt"

say "verifying the tree"
EXPECT_FULL=1
check_tree "$DATA_DIR" 0 || fail "the downloaded tree is incomplete, see above"
say "done. Next: python data/voc_bbox_setup.py --data-root $DATA_DIR"
