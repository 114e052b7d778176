/* medkd_blob_inspect FILE.bin: validate an MKDB container file and print its summary.
 * Exit status: 0 valid, 1 invalid container, 2 usage or I/O error. */
#include "medkd_blob.h"

#include <stdio.h>
#include <stdlib.h>

static unsigned char *read_all(FILE *f, size_t *size) {
    size_t cap = 1u << 16, len = 0, n;
    unsigned char *buf = (unsigned char *)malloc(cap), *grown;
    if (buf == NULL) return NULL;
    while ((n = fread(buf + len, 1, cap - len, f)) > 0) {
        len += n;
        if (len == cap) {
            grown = (unsigned char *)realloc(buf, cap * 2);
            if (grown == NULL) { free(buf); return NULL; }
            buf = grown;
            cap *= 2;
        }
    }
    if (ferror(f)) { free(buf); return NULL; }
    *size = len;
    return buf;
}

int main(int argc, char **argv) {
    FILE *f;
    unsigned char *data;
    size_t size = 0;
    medkd_blob blob;
    int rc;
    unsigned i;

    if (argc != 2) {
        fprintf(stderr, "usage: %s FILE.bin\n", argc > 0 ? argv[0] : "medkd_blob_inspect");
        return 2;
    }
    f = fopen(argv[1], "rb");
    if (f == NULL) {
        fprintf(stderr, "error: cannot open %s\n", argv[1]);
        return 2;
    }
    data = read_all(f, &size);
    fclose(f);
    if (data == NULL) {
        fprintf(stderr, "error: cannot read %s\n", argv[1]);
        return 2;
    }
    rc = medkd_blob_open(data, size, &blob);
    if (rc != MEDKD_BLOB_OK) {
        fprintf(stderr, "error: %s: %s (code %d)\n", argv[1], medkd_blob_strerror(rc), rc);
        free(data);
        return 1;
    }
    printf("file=%s container=%lu kind=%s version=%u payload=%lu crc=0x%08lx sha256_prefix=", argv[1],
           (unsigned long)size, medkd_blob_kind_name(blob.kind), blob.version,
           (unsigned long)blob.payload_size, (unsigned long)blob.crc32);
    for (i = 0; i < MEDKD_BLOB_SHA256_PREFIX_SIZE; ++i) printf("%02x", blob.sha256_prefix[i]);
    printf("\n");
    free(data);
    return 0;
}
