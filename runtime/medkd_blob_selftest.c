/* medkd_blob_selftest: known-answer tests of the checksums medkd_blob_open relies on,
 * run by ctest on the build's own target (under qemu for a cross build), so a compiler
 * or target that miscomputes them fails here, not on the device. Exit 0 when all pass. */
#include "medkd_blob.h"
#include "medkd_sha256.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int check_sha256(const char *name, const unsigned char *data, size_t size, const char *want_hex) {
    unsigned char digest[MEDKD_SHA256_DIGEST_SIZE];
    char hex[2 * MEDKD_SHA256_DIGEST_SIZE + 1];
    unsigned i;
    medkd_sha256(data, size, digest);
    for (i = 0; i < MEDKD_SHA256_DIGEST_SIZE; ++i) sprintf(hex + 2 * i, "%02x", digest[i]);
    if (strcmp(hex, want_hex) != 0) {
        fprintf(stderr, "FAIL sha256(%s) = %s, expected %s\n", name, hex, want_hex);
        return 1;
    }
    return 0;
}

int main(void) {
    /* FIPS 180-4 examples: empty, one block, two blocks (56 bytes: the length spills
     * into a second padding block), and a million 'a' (15625 blocks). */
    static const char two_blocks[] = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    unsigned char *million = (unsigned char *)malloc(1000000);
    int failed = 0;
    uint32_t crc;

    if (million == NULL) return 2;
    memset(million, 'a', 1000000);
    failed += check_sha256("\"\"", NULL, 0, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    failed += check_sha256("abc", (const unsigned char *)"abc", 3,
                           "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    failed += check_sha256("448-bit message", (const unsigned char *)two_blocks, sizeof two_blocks - 1,
                           "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    failed += check_sha256("a x 1000000", million, 1000000,
                           "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
    free(million);
    crc = medkd_blob_crc32(0, (const unsigned char *)"123456789", 9); /* the CRC-32 check value */
    if (crc != 0xCBF43926u) {
        fprintf(stderr, "FAIL crc32(\"123456789\") = 0x%08lx, expected 0xcbf43926\n", (unsigned long)crc);
        ++failed;
    }
    if (failed) return 1;
    printf("ok sha256 and crc32 known answers\n");
    return 0;
}
