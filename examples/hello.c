/* Prints the distribution's name and the C library it was built against and runs on. */
#include <gnu/libc-version.h>
#include <stdio.h>
#include <string.h>

int main(void)
{
    char line[256];
    char *name = NULL;
    FILE *f = fopen("/etc/os-release", "r");

    if (f != NULL) {
        while (fgets(line, sizeof line, f) != NULL) {
            if (strncmp(line, "PRETTY_NAME=", 12) == 0) {
                name = line + 12;
                name += (*name == '"');
                name[strcspn(name, "\"\n")] = '\0';
                break;
            }
        }
        fclose(f);
    }
    printf("hello from %s\n", name != NULL ? name : "an unknown distribution");
    printf("glibc %s (built against %d.%d)\n", gnu_get_libc_version(), __GLIBC__,
           __GLIBC_MINOR__);
    return 0;
}
