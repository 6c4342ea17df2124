# Seurat v3+ label transfer with the spot identity as the label (run by ssa_dask.evaluation.peers.seurat).
#
# Usage: Rscript --vanilla seurat_transfer.R DIR [npcs=30] [k_anchor=5] [k_filter=200]
#                                                [k_score=30] [k_weight=50]
# DIR holds sc.mtx (genes x cells) and spots.mtx (genes x spots), MatrixMarket, same genes in the
# same order, already log-normalised. Writes to DIR:
#   scores.bin  cells x spots prediction scores, float64 little-endian, row-major (cell by cell)
#   info.txt    key=value lines: npcs, k_anchor, k_filter, k_score, k_weight, n_anchors actually used
#
# The spots are the reference (each spot its own label "s<j>"), the cells the query:
# FindTransferAnchors (reference PCA projected onto the query, "pcaproject") then TransferData.
# Neighbour counts are capped so that they fit a reference of few spots.

args <- commandArgs(trailingOnly = TRUE)
if (length(args) < 1) stop("usage: seurat_transfer.R DIR [key=value ...]")
dir <- args[1]
opt <- list(npcs = 30, k_anchor = 5, k_filter = 200, k_score = 30, k_weight = 50)
for (a in args[-1]) {
  kv <- strsplit(a, "=", fixed = TRUE)[[1]]
  if (!(kv[1] %in% names(opt))) stop("unknown option ", kv[1])
  opt[[kv[1]]] <- as.numeric(kv[2])
}

suppressPackageStartupMessages({
  library(Matrix)
  library(Seurat)
})

sc <- as(readMM(file.path(dir, "sc.mtx")), "CsparseMatrix")
sp <- as(readMM(file.path(dir, "spots.mtx")), "CsparseMatrix")
if (nrow(sc) != nrow(sp)) stop("sc.mtx and spots.mtx have different numbers of genes")
genes <- paste0("g", seq_len(nrow(sc)))
rownames(sc) <- genes
rownames(sp) <- genes
colnames(sc) <- paste0("c", seq_len(ncol(sc)))
labels <- paste0("s", seq_len(ncol(sp)) - 1)
colnames(sp) <- labels
n_ref <- ncol(sp)
if (n_ref < 3) stop("Seurat transfer needs at least 3 spots")

ref <- CreateSeuratObject(counts = sp, min.cells = 0, min.features = 0)
qry <- CreateSeuratObject(counts = sc, min.cells = 0, min.features = 0)
# the matrices are already log-normalised: use them as the "data" slot as they are
ref <- SetAssayData(ref, slot = "data", new.data = sp)
qry <- SetAssayData(qry, slot = "data", new.data = sc)
ref$spot <- labels

npcs <- as.integer(min(opt$npcs, n_ref - 1, length(genes) - 1))
ref <- ScaleData(ref, features = genes, verbose = FALSE)
ref <- RunPCA(ref, features = genes, npcs = npcs, verbose = FALSE, approx = FALSE)
k_anchor <- as.integer(min(opt$k_anchor, n_ref - 1))
k_score <- as.integer(min(opt$k_score, n_ref - 1))
k_filter <- if (opt$k_filter >= n_ref) NA else as.integer(opt$k_filter)

anchors <- FindTransferAnchors(
  reference = ref, query = qry, features = genes,
  normalization.method = "LogNormalize", reference.reduction = "pca",
  dims = seq_len(npcs), npcs = npcs,
  k.anchor = k_anchor, k.filter = k_filter, k.score = k_score,
  verbose = FALSE
)
n_anchors <- nrow(anchors@anchors)
k_weight <- as.integer(min(opt$k_weight, n_anchors - 1))
if (k_weight < 1) stop("Seurat found too few anchors (", n_anchors, ") to transfer labels")

pred <- TransferData(
  anchorset = anchors, refdata = ref$spot, dims = seq_len(npcs),
  k.weight = k_weight, verbose = FALSE
)
scores <- as.matrix(pred[, paste0("prediction.score.", labels), drop = FALSE])
writeBin(as.vector(t(scores)), file.path(dir, "scores.bin"), size = 8, endian = "little")
writeLines(
  c(
    paste0("npcs=", npcs), paste0("k_anchor=", k_anchor), paste0("k_filter=", k_filter),
    paste0("k_score=", k_score), paste0("k_weight=", k_weight), paste0("n_anchors=", n_anchors)
  ),
  file.path(dir, "info.txt")
)
