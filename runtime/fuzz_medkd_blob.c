/* fuzz_medkd_blob: run medkd_blob_open over a corpus of inputs in one process, for the
 * sanitizer fuzz test (tests/test_firmware_fuzz.py builds it with
 * -fsanitize=address,undefined and compares every verdict with the Python reader).
 *
 *   fuzz_medkd_blob CORPUS        CORPUS = records of [u32 little-endian length][bytes];
 *                                 prints one line per record: the return code, and on
 *                                 success "kind payload_size" after it
 *   fuzz_medkd_blob --sha256 FILE...   prints the hex SHA-256 of each file
 *
 * Each input is copied into a heap block of exactly its length, so AddressSanitizer
 * reports any read past its end. Exit status: 0 done, 2 usage/I/O error, 3 an accepted
 * input broke an invariant of medkd_blob_open's result. */
#include "medkd_blob.h"
#include "medkd_sha256.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static unsigned char *read_file(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    unsigned char *buf = NULL, *grown;
    size_t cap = 0, len = 0, n;
    if (f == NULL) return NULL;
    do {
        if (len == cap) {
            cap = cap ? cap * 2 : 1u << 16;
            grown = (unsigned char *)realloc(buf, cap);
            if (grown == NULL) { free(buf); fclose(f); return NULL; }
            buf = grown;
        }
        n = fread(buf + len, 1, cap - len, f);
        len += n;
    } while (n > 0);
    if (ferror(f)) { free(buf); buf = NULL; }
    fclose(f);
    *size = len;
    return buf;
}

/* An accepted input must describe a payload inside the buffer; touching every payload
 * byte lets AddressSanitizer check that too. */
static int check_accepted(const unsigned char *data, size_t size, const medkd_blob *blob) {
    size_t i;
    unsigned sum = 0;
    if (blob->payload != data + MEDKD_BLOB_HEADER_SIZE) return 0;
    if (blob->payload_size == 0 || blob->payload_size > size - MEDKD_BLOB_HEADER_SIZE) return 0;
    for (i = 0; i < blob->payload_size; ++i) sum += blob->payload[i];
    return sum != 0xFFFFFFFFu; /* always true; keeps the loop */
}

static int run_corpus(const char *path) {
    size_t size = 0, pos = 0, len;
    unsigned char *corpus = read_file(path, &size), *input;
    static unsigned char empty[1];
    medkd_blob blob;
    int rc;
    if (corpus == NULL) { fprintf(stderr, "error: cannot read %s\n", path); return 2; }
    while (pos < size) {
        if (size - pos < 4) { fprintf(stderr, "error: %s: truncated record\n", path); free(corpus); return 2; }
        len = (size_t)corpus[pos] | ((size_t)corpus[pos + 1] << 8) | ((size_t)corpus[pos + 2] << 16) |
              ((size_t)corpus[pos + 3] << 24);
        pos += 4;
        if (len > size - pos) { fprintf(stderr, "error: %s: truncated record\n", path); free(corpus); return 2; }
        input = len ? (unsigned char *)malloc(len) : empty;
        if (input == NULL) { fprintf(stderr, "error: out of memory\n"); free(corpus); return 2; }
        if (len) memcpy(input, corpus + pos, len);
        pos += len;
        rc = medkd_blob_open(input, len, &blob);
        if (rc == MEDKD_BLOB_OK) {
            if (!check_accepted(input, len, &blob)) {
                fprintf(stderr, "error: accepted input broke an invariant\n");
                free(corpus);
                return 3;
            }
            printf("0 %u %lu\n", blob.kind, (unsigned long)blob.payload_size);
        } else {
            printf("%d\n", rc);
        }
        if (len) free(input);
    }
    free(corpus);
    return 0;
}

static int print_sha256(int count, char **paths) {
    unsigned char digest[MEDKD_SHA256_DIGEST_SIZE], *data, *exact;
    size_t size = 0;
    unsigned i;
    int k;
    for (k = 0; k < count; ++k) {
        data = read_file(paths[k], &size);
        if (data == NULL) { fprintf(stderr, "error: cannot read %s\n", paths[k]); return 2; }
        /* hash an exact-size copy (read_file over-allocates), so ASan sees any over-read */
        exact = size ? (unsigned char *)malloc(size) : NULL;
        if (size && exact == NULL) { free(data); fprintf(stderr, "error: out of memory\n"); return 2; }
        if (size) memcpy(exact, data, size);
        medkd_sha256(exact, size, digest);
        free(exact);
        for (i = 0; i < MEDKD_SHA256_DIGEST_SIZE; ++i) printf("%02x", digest[i]);
        printf("\n");
        free(data);
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 2 && strcmp(argv[1], "--sha256") == 0) return print_sha256(argc - 2, argv + 2);
    if (argc == 2) return run_corpus(argv[1]);
    fprintf(stderr, "usage: %s CORPUS | --sha256 FILE...\n", argc > 0 ? argv[0] : "fuzz_medkd_blob");
    return 2;
}
